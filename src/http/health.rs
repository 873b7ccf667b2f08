//! `GET /health`: 200 once the database answers, 503 otherwise. Needs no credentials, so load
//! balancers and start-up scripts can poll it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::AppState;

pub async fn health(State(state): State<AppState>) -> Response {
    if state.store.ping().await {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "the database is not reachable",
        )
        .into_response()
    }
}
