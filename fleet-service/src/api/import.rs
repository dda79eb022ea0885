//! Bulk import: thousands of devices registered before manufacturing in one request, from CSV
//! or a JSON array.
//!
//! Every row is answered: `created`, `skipped` (it exists already, exactly as the row says) or
//! `failed` with the line, column and what was wrong. Rows are checked in memory first, then
//! written [`BATCH`] to a transaction, so a bad row costs only itself and a device is written
//! whole or not at all. Uploading the same file again creates nothing and skips every row it
//! created the first time.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use broker::auth::{Place, ServicePrincipal};
use fleet_wire::{CohortId, DeviceId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Writer;
use super::error::ErrorBody;
use super::extract::{media_type, ApiBytes, ApiPath};
use super::validate::{pin_of, valid_tags};
use super::{access, ApiError, ApiState};
use crate::store::{Cohort, ImportOutcome, NewRegisteredDevice, Product};

/// Rows written per transaction.
pub(super) const BATCH: usize = 500;
/// Rows one request may carry.
const MAX_ROWS: usize = 100_000;
/// An import that created at least this many devices refreshes the planner's statistics.
const ANALYZE_AFTER: usize = 1000;
/// The largest body the import route reads (10,000 rows with certificates are about 10 MiB).
pub(super) const MAX_BODY: usize = 64 * 1024 * 1024;

/// What became of one row.
#[derive(Serialize, ToSchema)]
pub(super) struct ImportRow {
    /// 1-based position among the data rows (CSV: not counting the header; JSON: the array
    /// element).
    row: usize,
    /// CSV only: the line the row starts on (the header is line 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<u64>,
    /// As the row gave it, when it gave one.
    device_id: Option<String>,
    /// `created`, `skipped` or `failed`.
    #[schema(example = "failed")]
    outcome: &'static str,
    /// For `skipped` and `failed`: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<RowError>,
}

/// Why a row was skipped or failed.
#[derive(Serialize, ToSchema, Debug, Clone)]
pub(super) struct RowError {
    /// The column (CSV) or field (JSON) at fault, when one is.
    column: Option<String>,
    /// `exists` (skipped), or for failures: `malformed_row`, `invalid_device_id`,
    /// `duplicate_id`, `unknown_cohort`, `forbidden`, `invalid_tags`, `invalid_certificate`,
    /// `certificate_revoked`, `conflict`, `exists_differently`, `store_error`.
    #[schema(example = "unknown_cohort")]
    code: &'static str,
    message: String,
}

impl RowError {
    fn new(column: Option<&str>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            column: column.map(str::to_owned),
            code,
            message: message.into(),
        }
    }

    fn from_api(column: &str, e: ApiError) -> Self {
        Self::new(Some(column), e.code, e.message)
    }
}

/// The answer to an import.
#[derive(Serialize, ToSchema)]
pub(super) struct ImportReport {
    product_id: String,
    /// `csv` or `json`.
    format: &'static str,
    rows: usize,
    created: usize,
    skipped: usize,
    failed: usize,
    /// One entry per row, in the file's order.
    results: Vec<ImportRow>,
}

/// One row as the file gave it, before any check.
#[derive(Default)]
struct RawRow {
    id: Option<String>,
    cohort: Option<String>,
    tags: Option<serde_json::Map<String, serde_json::Value>>,
    certificate_pem: Option<String>,
    certificate_fingerprint: Option<String>,
}

/// A data row: where it starts (CSV), the device id it names (even when the rest cannot be
/// read), and the row or why it could not be read.
struct Parsed {
    line: Option<u64>,
    id: Option<String>,
    row: Result<RawRow, RowError>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Column {
    Id,
    Cohort,
    Tags,
    /// PEM or fingerprint, told apart by content.
    Certificate,
    CertificatePem,
    CertificateFingerprint,
}

impl Column {
    const NAMES: &'static str =
        "id, cohort (or cohort_id), tags, certificate, certificate_pem, certificate_fingerprint";

    fn parse(name: &str) -> Option<Self> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "id" | "device_id" => Column::Id,
            "cohort" | "cohort_id" => Column::Cohort,
            "tags" => Column::Tags,
            "certificate" => Column::Certificate,
            "certificate_pem" => Column::CertificatePem,
            "certificate_fingerprint" => Column::CertificateFingerprint,
            _ => return None,
        })
    }
}

fn invalid_file(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_file", message)
}

/// Tags of a CSV cell: `key=value` pairs separated by `;`, or a JSON object.
fn csv_tags(cell: &str) -> Result<serde_json::Map<String, serde_json::Value>, RowError> {
    let bad = |m: String| RowError::new(Some("tags"), "invalid_tags", m);
    if cell.starts_with('{') {
        return serde_json::from_str(cell)
            .map_err(|e| bad(format!("tags is not a JSON object: {e}")));
    }
    let mut out = serde_json::Map::new();
    for pair in cell.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(bad(format!(
                "tag {pair:?} is not key=value (tags are key=value pairs separated by ';', \
                 or a JSON object)"
            )));
        };
        let k = k.trim();
        if out
            .insert(k.to_owned(), serde_json::Value::String(v.trim().to_owned()))
            .is_some()
        {
            return Err(bad(format!("tag key {k:?} is given twice")));
        }
    }
    Ok(out)
}

/// The rows of a CSV file with a header line. A file whose header cannot be read is refused
/// whole; a row that cannot be read fails alone.
fn parse_csv(body: &[u8]) -> Result<Vec<Parsed>, ApiError> {
    // Spreadsheets often save UTF-8 with a byte-order mark; it is not part of the first name.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(body);
    let header = reader
        .byte_headers()
        .map_err(|e| invalid_file(format!("the header line cannot be read: {e}")))?
        .clone();
    let mut columns = Vec::with_capacity(header.len());
    for name in header.iter() {
        let name =
            std::str::from_utf8(name).map_err(|_| invalid_file("the header line is not UTF-8"))?;
        let column = Column::parse(name).ok_or_else(|| {
            invalid_file(format!(
                "unknown column {name:?} in the header line; the columns are {}",
                Column::NAMES
            ))
        })?;
        if columns.contains(&column) {
            return Err(invalid_file(format!(
                "column {name:?} is given twice in the header line"
            )));
        }
        columns.push(column);
    }
    if !columns.contains(&Column::Id) {
        return Err(invalid_file(format!(
            "the header line has no id column; the columns are {}",
            Column::NAMES
        )));
    }
    let names: Vec<String> = header
        .iter()
        .map(|n| String::from_utf8_lossy(n).trim().to_owned())
        .collect();
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        if rows.len() == MAX_ROWS {
            return Err(too_many_rows());
        }
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                rows.push(Parsed {
                    line: e.position().map(|p| p.line()),
                    id: None,
                    row: Err(RowError::new(
                        None,
                        "malformed_row",
                        format!("malformed CSV: {e}"),
                    )),
                });
                continue;
            }
        };
        let id = columns
            .iter()
            .position(|c| *c == Column::Id)
            .and_then(|i| record.get(i))
            .and_then(|cell| std::str::from_utf8(cell).ok())
            .filter(|cell| !cell.is_empty())
            .map(str::to_owned);
        rows.push(Parsed {
            line: record.position().map(|p| p.line()),
            id,
            row: csv_row(&record, &columns, &names),
        });
    }
    Ok(rows)
}

fn csv_row(
    record: &csv::ByteRecord,
    columns: &[Column],
    names: &[String],
) -> Result<RawRow, RowError> {
    if record.len() != columns.len() {
        return Err(RowError::new(
            None,
            "malformed_row",
            format!(
                "the row has {} fields, the header line {} (an unclosed quote joins lines into one field)",
                record.len(),
                columns.len()
            ),
        ));
    }
    let mut row = RawRow::default();
    for ((cell, column), name) in record.iter().zip(columns).zip(names) {
        let cell = std::str::from_utf8(cell).map_err(|_| {
            RowError::new(Some(name), "malformed_row", format!("{name} is not UTF-8"))
        })?;
        if cell.is_empty() {
            continue;
        }
        let cell = cell.to_owned();
        match column {
            Column::Id => row.id = Some(cell),
            Column::Cohort => row.cohort = Some(cell),
            Column::Tags => row.tags = Some(csv_tags(&cell)?),
            Column::CertificatePem => row.certificate_pem = Some(cell),
            Column::CertificateFingerprint => row.certificate_fingerprint = Some(cell),
            Column::Certificate if cell.starts_with("-----BEGIN") => {
                row.certificate_pem = Some(cell)
            }
            Column::Certificate => row.certificate_fingerprint = Some(cell),
        }
    }
    if row.certificate_pem.is_some() && row.certificate_fingerprint.is_some() {
        return Err(RowError::new(
            Some("certificate"),
            "invalid_certificate",
            "give a certificate PEM or a fingerprint, not both",
        ));
    }
    Ok(row)
}

/// One element of a JSON import.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    id: String,
    #[serde(default, alias = "cohort")]
    cohort_id: Option<String>,
    #[serde(default)]
    tags: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    certificate_pem: Option<String>,
    #[serde(default)]
    certificate_fingerprint: Option<String>,
}

/// 422 `too_many_rows`: refused as soon as the row after the limit is seen.
fn too_many_rows() -> ApiError {
    ApiError::unprocessable(
        "too_many_rows",
        format!("over {MAX_ROWS} rows; one import takes at most {MAX_ROWS}"),
    )
}

/// One element of the JSON array, read into a row as soon as it is parsed.
fn json_element(item: serde_json::Value) -> Parsed {
    let id = item.get("id").and_then(|v| v.as_str()).map(str::to_owned);
    if !item.is_object() {
        // serde would read an array into the row's fields by position: `["d"]` as id "d".
        return Parsed {
            line: None,
            id,
            row: Err(RowError::new(
                None,
                "malformed_row",
                "a row must be a JSON object",
            )),
        };
    }
    let row = serde_json::from_value::<JsonRow>(item)
        .map(|r| RawRow {
            id: Some(r.id),
            cohort: r.cohort_id,
            tags: r.tags,
            certificate_pem: r.certificate_pem,
            certificate_fingerprint: r.certificate_fingerprint,
        })
        .map_err(|e| {
            let message = super::extract::plain(&e.to_string());
            let column = message
                .split('`')
                .nth(1)
                .filter(|_| message.contains("field"))
                .map(str::to_owned);
            let mut err = RowError::new(None, "malformed_row", message);
            err.column = column;
            err
        });
    Parsed {
        line: None,
        id,
        row,
    }
}

/// Reads a JSON array element by element, keeping rows rather than the whole document, and
/// stops at the row after [`MAX_ROWS`].
struct JsonRows;

/// Why reading the array stopped: too many rows, or a JSON error.
const TOO_MANY_ROWS: &str = "\u{0}too_many_rows";

impl<'de> serde::de::Visitor<'de> for JsonRows {
    type Value = Vec<Parsed>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of device objects")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Parsed>, A::Error> {
        let mut rows = Vec::new();
        while let Some(item) = seq.next_element::<serde_json::Value>()? {
            if rows.len() == MAX_ROWS {
                return Err(serde::de::Error::custom(TOO_MANY_ROWS));
            }
            rows.push(json_element(item));
        }
        Ok(rows)
    }
}

/// The rows of a JSON array of objects. A body that is not an array is refused whole; an
/// element that is not a device object fails alone.
fn parse_json(body: &[u8]) -> Result<Vec<Parsed>, ApiError> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_slice(body);
    let rows = de
        .deserialize_seq(JsonRows)
        .and_then(|rows| de.end().map(|()| rows))
        .map_err(|e| {
            if e.to_string().starts_with(TOO_MANY_ROWS) {
                too_many_rows()
            } else if e.is_data() {
                ApiError::bad_request(
                    "invalid_body",
                    format!(
                        "expected a JSON array: {}",
                        super::extract::plain(&e.to_string())
                    ),
                )
            } else {
                ApiError::bad_request("malformed_json", e.to_string())
            }
        })?;
    Ok(rows)
}

/// What every row is checked against.
struct Context<'a> {
    by: &'a ServicePrincipal,
    product: &'a Product,
    /// The product's cohorts by id and by name.
    cohorts: HashMap<&'a str, &'a Cohort>,
    state: &'a ApiState,
}

impl Context<'_> {
    fn check(&self, raw: RawRow) -> Result<NewRegisteredDevice, RowError> {
        let id = raw
            .id
            .ok_or_else(|| RowError::new(Some("id"), "invalid_device_id", "id is missing"))?;
        let id = DeviceId::parse(&id).map_err(|e| {
            RowError::new(
                Some("id"),
                "invalid_device_id",
                format!("device id {id:?}: {e}"),
            )
        })?;
        let cohort = match &raw.cohort {
            Some(c) => Some(self.cohorts.get(c.as_str()).ok_or_else(|| {
                RowError::new(
                    Some("cohort"),
                    "unknown_cohort",
                    format!(
                        "cohort {c:?} is neither the id nor the name of a cohort of this product"
                    ),
                )
            })?),
            None => None,
        };
        if !self.by.sees(Place {
            org_id: &self.product.org_id,
            product_id: &self.product.id,
            cohort_id: Some(cohort.map_or("", |c| c.id.as_str())),
        }) {
            return Err(RowError::new(
                Some("cohort"),
                "forbidden",
                "this key may register devices only in its own cohort",
            ));
        }
        let cohort_id = cohort
            .map(|c| CohortId::parse(&c.id))
            .transpose()
            .map_err(|_| RowError::new(Some("cohort"), "unknown_cohort", "corrupt cohort id"))?;
        let tags =
            valid_tags(raw.tags.unwrap_or_default()).map_err(|e| RowError::from_api("tags", e))?;
        let column = if raw.certificate_pem.is_some() {
            "certificate_pem"
        } else {
            "certificate_fingerprint"
        };
        let pin = pin_of(
            raw.certificate_pem.as_deref(),
            raw.certificate_fingerprint.as_deref(),
        )
        .map_err(|e| RowError::from_api(column, e))?;
        if let Some(f) = &pin {
            if self.state.ops.is_revoked(f) {
                return Err(RowError::new(
                    Some(column),
                    "certificate_revoked",
                    format!("certificate {f} was revoked and is never admitted again"),
                ));
            }
        }
        Ok(NewRegisteredDevice {
            id,
            org_id: self.product.org_id.clone(),
            product_id: self.product.id.clone(),
            cohort_id,
            tags,
            pinned_fingerprint: pin,
        })
    }
}

/// Registers many devices before manufacturing, in state `registered`, from CSV
/// (`Content-Type: text/csv`) or a JSON array (`application/json`).
///
/// CSV has a header line naming its columns: `id` (required), `cohort` (a cohort's id or
/// name), `tags` (`key=value` pairs separated by `;`, or a JSON object), and `certificate`
/// (a PEM, quoted, or a SHA-256 fingerprint) or `certificate_pem` / `certificate_fingerprint`.
/// JSON elements are objects with `id`, `cohort_id`, `tags`, `certificate_pem`,
/// `certificate_fingerprint`, as `POST /api/v1/devices` takes them.
///
/// Every row is answered in `results`: `created`; `skipped` when the device exists exactly as
/// the row says (so a re-upload is idempotent); `failed` with the column and why. Rows are
/// written 500 to a transaction; a failed row never stops the others, and a device is written
/// whole or not at all.
///
/// Role: operator or admin, with a key that covers the product (a cohort-scoped key imports
/// into its cohort only).
#[utoipa::path(
    post,
    path = "/api/v1/products/{product_id}/devices/import",
    tag = "devices",
    security(("api_key" = [])),
    params(("product_id" = String, Path, description = "The product every row's device joins")),
    request_body(content = String, description = "CSV with a header line, or a JSON array of device objects", content_type = "text/csv"),
    responses(
        (status = 200, description = "Every row's outcome", body = ImportReport),
        (status = 400, description = "`invalid_path`, `malformed_json` or `invalid_body` (not a JSON array)", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown or revoked one", body = ErrorBody),
        (status = 403, description = "A viewer key", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 413, description = "The body is over 64 MiB", body = ErrorBody),
        (status = 415, description = "The body is neither `text/csv` nor `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_file` (a CSV header line that cannot be read, an unknown or repeated column, no id column) or `too_many_rows` (over 100,000)", body = ErrorBody),
        (status = 500, description = "`internal`: a store failure, logged", body = ErrorBody),
    ),
)]
pub(super) async fn import_devices(
    Writer(by): Writer,
    State(state): State<ApiState>,
    ApiPath(product_id): ApiPath<String>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes<MAX_BODY>,
) -> Result<Json<ImportReport>, ApiError> {
    let content_type = media_type(&headers);
    let product = access::product(&state, &by, &product_id).await?;
    let (format, parsed) = match content_type.as_str() {
        "text/csv" => ("csv", parse_csv(&body)?),
        "application/json" => ("json", parse_json(&body)?),
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the devices as text/csv or application/json",
            ))
        }
    };
    let cohorts = state.store.cohorts_of(&product.id).await?;
    let mut by_key: HashMap<&str, &Cohort> = HashMap::new();
    for c in &cohorts {
        by_key.insert(c.name.as_str(), c);
    }
    // An id wins over a name that happens to equal it.
    for c in &cohorts {
        by_key.insert(c.id.as_str(), c);
    }
    let ctx = Context {
        by: &by,
        product: &product,
        cohorts: by_key,
        state: &state,
    };

    let mut results = Vec::with_capacity(parsed.len());
    let mut valid: Vec<(usize, NewRegisteredDevice)> = Vec::new();
    let mut first_seen: HashMap<DeviceId, usize> = HashMap::new();
    for (n, Parsed { line, id, row }) in parsed.into_iter().enumerate() {
        let checked = row
            .and_then(|r| ctx.check(r))
            .and_then(|d| match first_seen.get(&d.id) {
                Some(&earlier) => Err(RowError::new(
                    Some("id"),
                    "duplicate_id",
                    format!("device id {} is on row {} already", d.id, earlier + 1),
                )),
                None => {
                    first_seen.insert(d.id.clone(), n);
                    Ok(d)
                }
            });
        let error = match checked {
            Ok(d) => {
                valid.push((n, d));
                None
            }
            Err(e) => Some(e),
        };
        results.push(ImportRow {
            row: n + 1,
            line,
            device_id: id,
            outcome: if error.is_some() { "failed" } else { "created" },
            error,
        });
    }

    for batch in valid.chunks(BATCH) {
        let devices: Vec<NewRegisteredDevice> = batch.iter().map(|(_, d)| d.clone()).collect();
        let outcomes = match state.ops.import_devices(&devices).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, rows = batch.len(), "device import batch failed");
                let message = "this row's batch was not written (a store failure, logged); \
                               upload the file again";
                for (n, _) in batch {
                    results[*n].outcome = "failed";
                    results[*n].error = Some(RowError::new(None, "store_error", message));
                }
                continue;
            }
        };
        for ((n, device), outcome) in batch.iter().zip(outcomes) {
            let result = &mut results[*n];
            match outcome {
                ImportOutcome::Created => {}
                ImportOutcome::Unchanged => {
                    result.outcome = "skipped";
                    result.error = Some(RowError::new(
                        None,
                        "exists",
                        "the device exists already, as this row describes it",
                    ));
                }
                ImportOutcome::Differs(what) => {
                    result.outcome = "failed";
                    result.error = Some(RowError::new(
                        None,
                        "exists_differently",
                        format!(
                            "the device exists with a different {what}; import does not \
                             change existing devices (PATCH /api/v1/devices/{} does)",
                            device.id
                        ),
                    ));
                }
                ImportOutcome::Taken => {
                    result.outcome = "failed";
                    result.error = Some(RowError::new(
                        Some("id"),
                        "conflict",
                        "the device id is taken (device ids are unique across the installation)",
                    ));
                }
            }
        }
    }
    let count = |o: &str| results.iter().filter(|r| r.outcome == o).count();
    let (created, skipped, failed) = (count("created"), count("skipped"), count("failed"));
    if created >= ANALYZE_AFTER {
        // Stale statistics only cost speed: a failure is logged, and the import stands.
        state.ops.refresh_device_statistics().await;
    }
    tracing::info!(
        product_id = %product.id, created, skipped, failed, by = %by.key_id,
        "devices imported"
    );
    Ok(Json(ImportReport {
        product_id: product.id.clone(),
        format,
        rows: results.len(),
        created,
        skipped,
        failed,
        results,
    }))
}

/// A row's fields as the import read them, and what the field checks an import runs on every
/// row (tags, certificate pin) make of them. For the fuzz targets (`fuzz/`).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedFields {
    pub id: Option<String>,
    pub cohort: Option<String>,
    pub tags: Option<serde_json::Map<String, serde_json::Value>>,
    pub certificate_pem: Option<String>,
    pub certificate_fingerprint: Option<String>,
    /// [`valid_tags`] of the row's tags: the tags stored, or the error code.
    pub checked_tags: Result<std::collections::BTreeMap<String, String>, &'static str>,
    /// [`pin_of`] of the row's certificate: the fingerprint pinned, or the error code.
    pub pin: Result<Option<String>, &'static str>,
}

/// One data row of an import ([`read_import`]).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedRow {
    pub line: Option<u64>,
    pub id: Option<String>,
    /// The fields, or the failing column and error code.
    pub row: Result<ImportedFields, (Option<String>, &'static str)>,
}

/// Reads an import body as the route does (`csv`: `text/csv`, else `application/json`), up
/// to the checks that need the store. The error is the refusal's code.
#[doc(hidden)]
pub fn read_import(body: &[u8], csv: bool) -> Result<Vec<ImportedRow>, &'static str> {
    let parsed = if csv {
        parse_csv(body)
    } else {
        parse_json(body)
    };
    let rows = parsed.map_err(|e| e.code)?;
    Ok(rows
        .into_iter()
        .map(|p| ImportedRow {
            line: p.line,
            id: p.id,
            row: p
                .row
                .map(|r| ImportedFields {
                    checked_tags: valid_tags(r.tags.clone().unwrap_or_default())
                        .map_err(|e| e.code),
                    pin: pin_of(
                        r.certificate_pem.as_deref(),
                        r.certificate_fingerprint.as_deref(),
                    )
                    .map_err(|e| e.code),
                    id: r.id,
                    cohort: r.cohort,
                    tags: r.tags,
                    certificate_pem: r.certificate_pem,
                    certificate_fingerprint: r.certificate_fingerprint,
                })
                .map_err(|e| (e.column, e.code)),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Row = (Option<u64>, Option<String>, Result<RawRow, RowError>);

    fn ok_rows(csv: &str) -> Vec<Row> {
        parse_csv(csv.as_bytes())
            .unwrap()
            .into_iter()
            .map(|p| (p.line, p.id, p.row))
            .collect()
    }

    #[test]
    fn csv_rows_lines_and_columns() {
        let rows = ok_rows(
            "\u{feff}ID, Cohort ,tags,certificate\n\
             d-1,c,a=1; b = 2,\n\
             d-2,,,\"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\"\n\
             d-3,,,ab:cd\n\
             d-4,too,many,fields,here\n\
             d-5,,a=1;a=2,\n",
        );
        assert_eq!(rows.len(), 5);
        let lines: Vec<_> = rows.iter().map(|r| r.0).collect();
        assert_eq!(lines, [Some(2), Some(3), Some(6), Some(7), Some(8)]);
        let d1 = rows[0].2.as_ref().unwrap();
        assert_eq!(d1.cohort.as_deref(), Some("c"));
        assert_eq!(
            d1.tags.as_ref().unwrap(),
            serde_json::json!({"a": "1", "b": "2"}).as_object().unwrap()
        );
        assert!(rows[1].2.as_ref().unwrap().certificate_pem.is_some());
        assert_eq!(
            rows[2]
                .2
                .as_ref()
                .unwrap()
                .certificate_fingerprint
                .as_deref(),
            Some("ab:cd")
        );
        let e = rows[3].2.as_ref().err().unwrap();
        assert_eq!(
            (e.code, rows[3].1.as_deref()),
            ("malformed_row", Some("d-4"))
        );
        let e = rows[4].2.as_ref().err().unwrap();
        assert_eq!(
            (e.code, e.column.as_deref()),
            ("invalid_tags", Some("tags"))
        );
    }

    #[test]
    fn unreadable_headers_refuse_the_file() {
        for csv in ["", "cohort,tags\n", "id,colour\n", "id,id\n"] {
            let e = parse_csv(csv.as_bytes()).err().unwrap();
            assert_eq!(e.code, "invalid_file", "{csv:?}");
        }
    }

    #[test]
    fn json_rows_fail_alone() {
        let rows = parse_json(br#"[{"id": "a"}, {"id": "b", "colour": 1}, 3]"#).unwrap();
        assert!(rows[0].row.is_ok());
        let e = rows[1].row.as_ref().err().unwrap();
        assert_eq!(
            (e.column.as_deref(), rows[1].id.as_deref()),
            (Some("colour"), Some("b"))
        );
        assert!(rows[2].row.is_err());
        // Not read by position into the fields, as serde would.
        let rows = parse_json(br#"[["d"], ["e", null, null, null, null]]"#).unwrap();
        for r in &rows {
            let e = r.row.as_ref().err().unwrap();
            assert_eq!((e.code, r.id.as_deref()), ("malformed_row", None));
        }
        assert_eq!(parse_json(b"{}").err().unwrap().code, "invalid_body");
        assert_eq!(parse_json(b"[").err().unwrap().code, "malformed_json");
    }
}
