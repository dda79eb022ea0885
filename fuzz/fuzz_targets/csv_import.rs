//! The bulk device import's parser (`fleet-service/src/api/import.rs`): an arbitrary body read
//! as `text/csv` and as `application/json`, with the field checks every row gets (tags,
//! certificate pin).
//!
//! Checks, besides never panicking:
//! - rows keep the file's order (CSV lines never go backwards), and the device id reported for
//!   a row is the one its fields hold;
//! - cells are trimmed, a row never holds both a certificate PEM and a fingerprint, a pin is 64
//!   lowercase hex digits, and stored tags have non-empty keys without `:`;
//! - round trips: the rows read from CSV, written back as CSV (quoted as the csv crate quotes)
//!   and read again, are the same rows; rows read from either format, written as a JSON array,
//!   read the same through the JSON import, so a device reads the same from either format.
#![no_main]

use fleet_service::api::fuzzing::{read_import, ImportedFields, ImportedRow};
use libfuzzer_sys::fuzz_target;

fleet_fuzz::bounded_allocations!();

fn check_rows(rows: &[ImportedRow], csv: bool) {
    let mut last_line = 0;
    for r in rows {
        if csv {
            let line = r.line.expect("CSV rows know their line");
            assert!(line >= last_line, "CSV rows out of order");
            last_line = line;
        } else {
            assert!(r.line.is_none());
        }
        let Ok(f) = &r.row else {
            continue;
        };
        assert_eq!(r.id, f.id, "the id reported is the row's");
        if csv {
            for cell in [
                &f.id,
                &f.cohort,
                &f.certificate_pem,
                &f.certificate_fingerprint,
            ]
            .into_iter()
            .flatten()
            {
                assert!(!cell.is_empty());
                assert_eq!(cell.trim_matches(|c: char| c.is_ascii_whitespace()), cell);
            }
        }
        assert!(
            !(f.certificate_pem.is_some() && f.certificate_fingerprint.is_some()),
            "a PEM and a fingerprint both"
        );
        if let Ok(Some(pin)) = &f.pin {
            assert_eq!(pin.len(), 64);
            assert!(pin
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        }
        if let Ok(tags) = &f.checked_tags {
            for (k, v) in tags {
                assert!(
                    !k.is_empty() && !k.contains(':') && !v.is_empty(),
                    "{k:?}={v:?}"
                );
            }
        }
    }
}

/// Tags as a JSON object text, when JSON gives them back unchanged (numbers may not survive
/// a float round trip in serde_json's default parser; those rows are left out).
fn tags_text(f: &ImportedFields) -> Option<Option<String>> {
    match &f.tags {
        None => Some(None),
        Some(map) => {
            let text = serde_json::to_string(map).expect("a map serializes");
            let back: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&text).expect("serde_json reads what it writes");
            (&back == map).then_some(Some(text))
        }
    }
}

/// The rows that re-encode faithfully, with their tags text.
fn faithful(rows: &[ImportedRow]) -> Vec<(&ImportedFields, Option<String>)> {
    rows.iter()
        .filter_map(|r| r.row.as_ref().ok())
        .filter_map(|f| tags_text(f).map(|t| (f, t)))
        .collect()
}

fn same_fields(a: &ImportedFields, b: &ImportedFields, how: &str) {
    assert_eq!(
        (
            &a.id,
            &a.cohort,
            &a.tags,
            &a.certificate_pem,
            &a.certificate_fingerprint
        ),
        (
            &b.id,
            &b.cohort,
            &b.tags,
            &b.certificate_pem,
            &b.certificate_fingerprint
        ),
        "{how}"
    );
    assert_eq!(a.checked_tags, b.checked_tags, "{how}: tags checked");
    assert_eq!(a.pin, b.pin, "{how}: pin");
}

fn csv_round_trip(rows: &[(&ImportedFields, Option<String>)]) {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "id",
        "cohort",
        "tags",
        "certificate_pem",
        "certificate_fingerprint",
    ])
    .unwrap();
    for (f, tags) in rows {
        let cell = |v: &Option<String>| v.clone().unwrap_or_default();
        w.write_record([
            cell(&f.id),
            cell(&f.cohort),
            cell(tags),
            cell(&f.certificate_pem),
            cell(&f.certificate_fingerprint),
        ])
        .unwrap();
    }
    let body = w.into_inner().unwrap();
    let again = read_import(&body, true).expect("a file the csv crate wrote is read");
    assert_eq!(again.len(), rows.len(), "CSV round trip: rows");
    for ((f, _), g) in rows.iter().zip(&again) {
        let g = g
            .row
            .as_ref()
            .expect("CSV round trip: a row that read fails");
        same_fields(f, g, "CSV round trip");
    }
}

fn json_round_trip(rows: &[(&ImportedFields, Option<String>)]) {
    let rows: Vec<_> = rows.iter().filter(|(f, _)| f.id.is_some()).collect();
    let array: Vec<serde_json::Value> = rows
        .iter()
        .map(|(f, _)| {
            serde_json::json!({
                "id": f.id,
                "cohort_id": f.cohort,
                "tags": f.tags,
                "certificate_pem": f.certificate_pem,
                "certificate_fingerprint": f.certificate_fingerprint,
            })
        })
        .collect();
    let body = serde_json::to_vec(&array).unwrap();
    let again = read_import(&body, false).expect("a JSON array of rows is read");
    assert_eq!(again.len(), rows.len(), "JSON round trip: rows");
    for ((f, _), g) in rows.iter().zip(&again) {
        let g = g
            .row
            .as_ref()
            .expect("JSON round trip: a row that read fails");
        same_fields(f, g, "JSON round trip");
    }
}

fuzz_target!(|data: &[u8]| {
    for csv in [true, false] {
        let Ok(rows) = read_import(data, csv) else {
            continue;
        };
        check_rows(&rows, csv);
        let rows = faithful(&rows);
        // JSON keeps what CSV trims or cannot tell from nothing (an empty string), so only
        // what came from CSV goes back to CSV.
        if csv {
            csv_round_trip(&rows);
        }
        json_round_trip(&rows);
    }
});
