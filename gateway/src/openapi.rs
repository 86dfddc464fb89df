//! The public API's contract: an OpenAPI 3.1 document generated from the handlers' annotations
//! (utoipa), served at `GET /openapi.json`.
//!
//! The gateway forwards bodies as bytes, so the shapes of orders and prices are not Rust types
//! here: the schemas below describe what the owning services send and accept. They are checked
//! against the running system, not trusted: CI runs schemathesis against the whole stack, which
//! sends valid and invalid requests to every operation and fails on any `5xx` or any answer that
//! does not match this document.

use axum::Json;
use axum::response::IntoResponse;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, Object, ObjectBuilder, Ref, RefOr, Response, ResponseBuilder, Type,
};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::routes;

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shop gateway",
        description = "The public API of the reference microservice system: orders, products and prices. Errors are RFC 9457 problem documents carrying the request's correlation ID.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        routes::orders::create_order,
        routes::orders::get_order,
        routes::orders::cancel_order,
        routes::products::get_product,
        routes::prices::get_price,
        routes::prices::put_price,
    ),
    components(schemas(
        OrderRequest, OrderItem, Order, OrderLine, Price, SetPrice, routes::products::Product,
        Problem, Liveness, Readiness,
    )),
    modifiers(&OperationsRoutes, &EdgeResponses),
    tags(
        (name = "orders", description = "Placing, reading and cancelling orders"),
        (name = "products", description = "Price and availability in one answer"),
        (name = "prices", description = "Prices; changing one needs the admin key"),
        (name = "operations", description = "Health and metrics, never rate-limited or shed"),
    ),
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn document() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

/// A SKU: a catalogue code of 1–64 characters.
pub const SKU_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";

/// `POST /api/orders` body.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only: the body is forwarded as bytes
pub struct OrderRequest {
    /// The lines; lines naming the same SKU are merged. At most 100 distinct SKUs.
    #[schema(min_items = 1)]
    items: Vec<OrderItem>,
}

/// One requested line.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct OrderItem {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "BK-12")]
    sku: String,
    /// Units, at least one.
    #[schema(minimum = 1, maximum = 4_294_967_295_u64, example = 2)]
    qty: u64,
}

/// A placed (or cancelled) order.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct Order {
    #[schema(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    id: String,
    #[schema(pattern = "^(placed|cancelled)$")]
    status: String,
    lines: Vec<OrderLine>,
    /// The order's total, in `currency`, with at most two decimals.
    #[schema(minimum = 0)]
    total: f64,
    currency: String,
    /// Whether some line was priced from order-service's cache while pricing was unavailable.
    priced_from_cache: bool,
    #[schema(format = DateTime)]
    created_at: String,
}

/// One line of an order.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct OrderLine {
    sku: String,
    #[schema(minimum = 1)]
    qty: u64,
    #[schema(minimum = 0)]
    unit_price: f64,
    #[schema(minimum = 0)]
    line_total: f64,
    #[schema(pattern = "^(live|cache)$")]
    price_source: String,
    #[schema(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    reservation_id: String,
}

/// A SKU's price.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct Price {
    sku: String,
    name: String,
    #[schema(minimum = 0)]
    price: f64,
    currency: String,
    /// Units sold in placed orders.
    units_sold: i64,
    /// The price's version: 1 when the SKU was created, one more with each change.
    #[schema(minimum = 1)]
    version: i64,
}

/// `PUT /api/prices/{sku}` body.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SetPrice {
    /// A non-negative amount with at most two decimals.
    #[schema(minimum = 0, maximum = 10_000_000_000_000_u64, example = 12.99)]
    price: f64,
    /// ISO 4217 code; the SKU's current currency (or EUR for a new one) when absent.
    #[schema(pattern = "^[A-Z]{3}$", example = "EUR")]
    currency: Option<String>,
}

/// An RFC 9457 problem document.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct Problem {
    #[schema(rename = "type")]
    kind: String,
    title: String,
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    detail: Option<String>,
    /// The request's correlation ID, to quote when reporting the problem.
    correlation_id: Option<String>,
}

/// `GET /healthz`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Liveness {
    status: String,
    service: String,
}

/// `GET /readyz`: overall readiness and each check's state.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Readiness {
    service: String,
    #[schema(pattern = "^(ready|not ready)$")]
    status: String,
    checks: Object,
}

/// Adds `/healthz`, `/readyz` and `/metrics`, which the shared chassis serves (so they have no
/// handler in this crate to annotate).
struct OperationsRoutes;

impl Modify for OperationsRoutes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let json = |schema: &str| {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(schema)))
                .build()
        };
        let operation = |id: &str, summary: &str, ok: Response| {
            OperationBuilder::new()
                .operation_id(Some(id))
                .tag("operations")
                .summary(Some(summary))
                .response("200", ok)
                .build()
        };
        let paths = &mut openapi.paths;
        paths.add_path_operation(
            "/healthz",
            vec![HttpMethod::Get],
            operation(
                "liveness",
                "Liveness: the process serves HTTP",
                ResponseBuilder::new()
                    .description("Alive")
                    .content("application/json", json("Liveness"))
                    .build(),
            ),
        );
        paths.add_path_operation(
            "/readyz",
            vec![HttpMethod::Get],
            operation(
                "readiness",
                "Readiness: the dependencies' breakers, shown but never making the gateway unready",
                ResponseBuilder::new()
                    .description("Ready")
                    .content("application/json", json("Readiness"))
                    .build(),
            ),
        );
        paths.add_path_operation(
            "/metrics",
            vec![HttpMethod::Get],
            operation(
                "metrics",
                "Prometheus metrics (OpenMetrics text)",
                ResponseBuilder::new()
                    .description("The metrics")
                    .content(
                        "application/openmetrics-text",
                        ContentBuilder::new()
                            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                            .build(),
                    )
                    .build(),
            ),
        );
    }
}

/// Adds the answers every public operation may give, whichever handler serves it: `429` from the
/// per-client rate limit, `503` from admission control or an unavailable dependency, `502` and
/// `504` from dependencies; and the admin key's security scheme.
struct EdgeResponses;

impl Modify for EdgeResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
        for (path, item) in &mut openapi.paths.paths {
            if !path.starts_with("/api/") {
                continue;
            }
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                add_edge_responses(operation);
            }
        }
    }
}

fn add_edge_responses(operation: &mut Operation) {
    let responses = &mut operation.responses.responses;
    let mut add = |status: &str, response: Response| {
        responses
            .entry(status.to_owned())
            .or_insert(RefOr::T(response));
    };
    add(
        "429",
        problem_response("This client is over its rate limit")
            .header(
                "Retry-After",
                seconds_header("Seconds until a request is accepted"),
            )
            .header(
                "RateLimit",
                string_header("What is left of the quota (IETF RateLimit)"),
            )
            .header(
                "RateLimit-Policy",
                string_header("The quota (IETF RateLimit-Policy)"),
            )
            .build(),
    );
    add(
        "503",
        problem_response("Overloaded (admission control) or a dependency is unavailable")
            .header(
                "Retry-After",
                seconds_header("Seconds after which to retry"),
            )
            .build(),
    );
    add(
        "502",
        problem_response("A dependency answered badly").build(),
    );
    add(
        "504",
        problem_response("A dependency did not answer within the request's budget").build(),
    );
}

/// A response whose body is a [`Problem`].
pub(crate) fn problem_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        shared::problem::CONTENT_TYPE,
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    )
}

fn seconds_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0)),
        )
        .description(Some(description))
        .build()
}

fn string_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::String))
        .description(Some(description))
        .build()
}
