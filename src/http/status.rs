//! `GET /$status`: what the console's health page shows, for subjects allowed it (root; a
//! Client by an AccessPolicy): the database, each standby as its last check found it, where
//! export files go, and the limits the server runs with. `GET /health` stays the public,
//! bare answer for load balancers.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::AppState;

pub async fn status(State(state): State<AppState>) -> Response {
    let up = state.store.ping().await;
    let replicas: Vec<Value> = state
        .readers
        .replica_states()
        .into_iter()
        .map(|(name, up, detail)| json!({"name": name, "up": up, "detail": detail}))
        .collect();
    let (kind, location) = state.background.exports.storage_place();
    let limits: Map<String, Value> = state
        .settings
        .limits
        .iter()
        .map(|(flag, value)| (flag.clone(), Value::String(value.clone())))
        .collect();
    Json(json!({
        "database": {
            "up": up,
            "detail": if up { "answers" } else { "not reachable" },
        },
        "replicas": replicas,
        "storage": {"kind": kind, "location": location},
        "limits": limits,
    }))
    .into_response()
}
