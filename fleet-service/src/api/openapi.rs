//! The OpenAPI document of the REST bridge, generated from the handlers' `#[utoipa::path]`
//! annotations and the bodies' `ToSchema` derives.

use broker::auth::ServiceRole;
use fleet_wire::update::DeploymentState;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi};

use crate::store::{DeferReason, DeploymentKind, DeviceState, ExecutionStatus};

use super::{
    audit, cas, catalog, commands, devices, error, import, keys, lifecycle, orgs, quarantine,
    summary, updates,
};

/// The whole REST bridge. Every handler the router serves is listed here (a test checks it);
/// schemas the operations name are collected from them.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fleet REST bridge",
        version = env!("CARGO_PKG_VERSION"),
        description = "The operator's REST API of the fleet service, under `/api/v1`.\n\n\
            Every operation but `/api/v1/health` and `/api/v1/openapi.json` wants \
            `Authorization: Bearer <api key>`; each operation's description names the role it \
            needs (viewer < operator < admin). Authentication and role come before the body \
            is looked at. A key belongs to one organization and sees nothing of another: \
            another organization's resource is a 404, exactly like a missing one. A key may be \
            scoped to one product, or one cohort of it; organization-level resources (CAs, API \
            keys, signing keys) need an unscoped key. Every error, including unknown routes (404) and methods (405), has \
            the shape `{\"error\":{\"code\":\"...\",\"message\":\"...\"}}`.\n\n\
            A JSON body is exactly one JSON object (nothing after it, no key twice, no NUL \
            character); a whole number may be written `5.0`. A body over 2 MiB (64 MiB for the \
            device import) is a 413 `payload_too_large`; a path or query with a control \
            character (such as `%00`) is a 400 `invalid_path` or `invalid_query`. Every list \
            pages the same way: `limit` (1 to 1000, 100 by default) and `cursor` (the previous \
            page's `next_cursor`).",
    ),
    paths(
        super::health,
        super::healthz,
        super::ready,
        serve,
        orgs::create_org,
        orgs::list_orgs,
        orgs::get_org,
        orgs::delete_org,
        catalog::create_product,
        catalog::list_products,
        catalog::get_product,
        catalog::delete_product,
        catalog::create_cohort,
        catalog::list_cohorts,
        catalog::get_cohort,
        catalog::delete_cohort,
        cas::create_ca,
        cas::verification_code,
        cas::list_cas,
        cas::get_ca,
        cas::update_ca,
        cas::delete_ca,
        devices::list_devices,
        lifecycle::delete_devices,
        lifecycle::create_device,
        import::import_devices,
        summary::fleet_summary,
        devices::get_device,
        lifecycle::update_device,
        lifecycle::delete_device,
        lifecycle::revoke_certificate,
        devices::device_telemetry,
        commands::send_device_command,
        commands::get_device_command,
        commands::send_cohort_command,
        commands::get_cohort_command,
        quarantine::quarantine,
        quarantine::lift_quarantine,
        updates::device_executions,
        updates::create_signing_key,
        updates::list_signing_keys,
        updates::revoke_signing_key,
        updates::create_release,
        updates::list_releases,
        updates::get_release,
        updates::create_deployment,
        updates::list_deployments,
        updates::get_deployment,
        updates::pause_deployment,
        updates::resume_deployment,
        updates::cancel_deployment,
        updates::rollback_deployment,
        updates::promote_deployment,
        updates::list_executions,
        super::broker_metrics,
        keys::create_key,
        keys::list_keys,
        keys::revoke_key,
        audit::list_audit,
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&BearerKey, &TagLimits),
    tags(
        (name = "service", description = "Health, this document, broker counters"),
        (name = "organizations", description = "Organizations: the boundary of everything else"),
        (name = "catalog", description = "Products and their cohorts"),
        (name = "ca-certificates", description = "Manufacturing CAs and just-in-time provisioning"),
        (name = "devices", description = "Devices, their telemetry and update executions"),
        (name = "commands", description = "Commands to a device or a cohort, and the devices' acknowledgements"),
        (name = "updates", description = "Signing keys, releases, deployments and executions"),
        (name = "api-keys", description = "API keys and their roles"),
        (name = "audit", description = "Who did what, when, and how it ended"),
    ),
)]
pub struct ApiDoc;

/// The document as served and committed: pretty-printed, with a final newline.
pub fn document() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    json.push('\n');
    json
}

/// This OpenAPI document.
///
/// No API key needed.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document of the REST bridge", body = Object)),
)]
pub(super) async fn serve() -> impl axum::response::IntoResponse {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOCUMENT.get_or_init(document).as_str(),
    )
}

/// The `api_key` security scheme every authenticated operation names.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key: `Authorization: Bearer <api key>`."))
                    .build(),
            ),
        );
    }
}

/// States the cap on tags per device (`validate::MAX_TAGS`) on every schema's `tags` object
/// (utoipa has no field attribute for `maxProperties`).
struct TagLimits;

impl Modify for TagLimits {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for schema in components.schemas.values_mut() {
            let RefOr::T(Schema::Object(body)) = schema else {
                continue;
            };
            if let Some(RefOr::T(Schema::Object(tags))) = body.properties.get_mut("tags") {
                tags.max_properties = Some(super::validate::MAX_TAGS);
            }
        }
    }
}

/// A named string schema whose values come from the code's own `as_str`, so the document lists
/// exactly what the service writes and parses.
macro_rules! string_enum {
    ($(#[doc = $doc:literal])+ $name:ident as $schema:literal = $values:expr) => {
        $(#[doc = $doc])+
        pub(super) struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some(concat!($($doc, "\n"),+).trim()))
                    .enum_values(Some($values))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                $schema.into()
            }
        }
    };
}

string_enum! {
    /// The role of an API key: `viewer` reads; `operator` also changes products, cohorts, CAs,
    /// releases and deployments; `admin` also manages API keys and signing keys.
    ApiKeyRole as "ApiKeyRole" = roles().map(ServiceRole::as_str)
}

string_enum! {
    /// A device's state.
    DeviceStateName as "DeviceState" = DeviceState::ALL.map(DeviceState::as_str)
}

string_enum! {
    /// A deployment's state.
    DeploymentStateName as "DeploymentState" = deployment_states().map(DeploymentState::as_str)
}

string_enum! {
    /// What a deployment does: install a release, or take a cohort back to one.
    DeploymentKindName as "DeploymentKind" = deployment_kinds().map(DeploymentKind::as_str)
}

string_enum! {
    /// Where one device is with one deployment.
    ExecutionStatusName as "ExecutionStatus" = ExecutionStatus::ALL.map(ExecutionStatus::as_str)
}

string_enum! {
    /// Why a deployment's execution is `deferred`: what kept its device from taking part.
    DeferReasonName as "DeferReason" = DeferReason::ALL.map(DeferReason::as_str)
}

// The enums below have no `ALL`; the matches make adding a variant a compile error here.

fn roles() -> [ServiceRole; 3] {
    use ServiceRole::*;
    let all = [Viewer, Operator, Admin];
    for r in all {
        match r {
            Viewer | Operator | Admin => {}
        }
    }
    all
}

fn deployment_states() -> [DeploymentState; 5] {
    use DeploymentState::*;
    let all = [Active, Paused, Completed, Canceled, RolledBack];
    for s in all {
        match s {
            Active | Paused | Completed | Canceled | RolledBack => {}
        }
    }
    all
}

fn deployment_kinds() -> [DeploymentKind; 2] {
    use DeploymentKind::*;
    let all = [Rollout, Rollback];
    for k in all {
        match k {
            Rollout | Rollback => {}
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use utoipa::openapi::HttpMethod;

    use super::*;

    /// The committed copy, at the repository root.
    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.json");

    #[test]
    fn openapi_json_is_committed_and_current() {
        let generated = document();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(COMMITTED, &generated).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == generated,
            "openapi.json differs from the document the code generates; regenerate it with \
             `UPDATE_OPENAPI=1 cargo test -p fleet-service openapi` and commit it"
        );
    }

    fn method_name(m: &HttpMethod) -> &'static str {
        match m {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Head => "HEAD",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Trace => "TRACE",
        }
    }

    /// Every (method, path) of the document, paths in OpenAPI's `{param}` syntax.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = ApiDoc::openapi();
        let mut out = BTreeSet::new();
        for (path, item) in &doc.paths.paths {
            let ops = [
                (HttpMethod::Get, &item.get),
                (HttpMethod::Post, &item.post),
                (HttpMethod::Put, &item.put),
                (HttpMethod::Delete, &item.delete),
                (HttpMethod::Options, &item.options),
                (HttpMethod::Head, &item.head),
                (HttpMethod::Patch, &item.patch),
                (HttpMethod::Trace, &item.trace),
            ];
            for (method, op) in ops {
                if op.is_some() {
                    out.insert((method_name(&method).to_owned(), path.clone()));
                }
            }
        }
        out
    }

    /// `/a/:b/c` in axum 0.7's syntax is `/a/{b}/c` in OpenAPI's.
    fn openapi_path(axum_path: &str) -> String {
        axum_path
            .split('/')
            .map(|seg| match seg.strip_prefix(':') {
                Some(name) => format!("{{{name}}}"),
                None => seg.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn openapi_documents_every_route_and_only_those() {
        let served: BTreeSet<(String, String)> = crate::api::routes()
            .iter()
            .map(|r| (r.method.as_str().to_owned(), openapi_path(r.path)))
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "served but missing from the OpenAPI document: {undocumented:?}; annotate the \
             handler with #[utoipa::path(...)] and list it in ApiDoc's paths(...)"
        );
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            unserved.is_empty(),
            "in the OpenAPI document but not in api::routes(): {unserved:?}"
        );
        assert_eq!(
            served.len(),
            crate::api::routes().len(),
            "a route is listed twice"
        );
    }

    /// The table is the router's only source of routes: anything added to the router beside it
    /// would escape the check above.
    #[test]
    fn openapi_route_table_is_the_only_way_into_the_router() {
        let source = include_str!("mod.rs");
        for call in [".route_service(", ".nest(", ".nest_service(", ".merge("] {
            assert!(
                !source.contains(call),
                "api/mod.rs calls {call}: add routes to api::routes() instead"
            );
        }
        assert_eq!(
            source.matches(".route(").count(),
            1,
            "api/mod.rs calls Router::route outside the fold over api::routes(): add the route \
             to the table instead, and document its handler"
        );
    }

    #[test]
    fn openapi_operations_are_secured_except_the_open_ones() {
        let doc = ApiDoc::openapi();
        let open = [
            "/api/v1/health",
            "/api/v1/openapi.json",
            "/healthz",
            "/readyz",
        ];
        for (path, item) in &doc.paths.paths {
            for op in [&item.get, &item.post, &item.put, &item.delete, &item.patch]
                .into_iter()
                .flatten()
            {
                let id = op.operation_id.clone().unwrap_or_default();
                let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
                assert_eq!(secured, !open.contains(&path.as_str()), "{id} ({path})");
                if secured {
                    let text = op.description.clone().unwrap_or_default();
                    assert!(
                        ["Role: viewer", "Role: operator or admin", "Role: admin"]
                            .iter()
                            .any(|r| text.contains(r)),
                        "{id} ({path}) must say which role it needs: {text:?}"
                    );
                    let statuses: Vec<&String> = op.responses.responses.keys().collect();
                    assert!(
                        statuses.iter().any(|s| *s == "401"),
                        "{id} ({path}) needs a key, so it answers 401"
                    );
                }
            }
        }
    }
}
