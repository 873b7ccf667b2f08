//! `GET /$counts`: how many resources of each type there are, for the types the asker may
//! search (each decided by [`crate::auth::Authenticator::authorize`] as `GET /{type}` on its
//! own would be): the console's data page. Open to every signed-in subject, like a search
//! with `_summary=count` of each type it may search.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::bundle::Who;
use super::context::ApiContext;
use super::error::ApiError;
use super::AppState;
use crate::resource_type::ResourceType;
use crate::store::counts::counts as count_types;

pub async fn counts(
    State(state): State<AppState>,
    ctx: ApiContext,
    who: Who,
) -> Result<Response, ApiError> {
    let mut allowed = Vec::new();
    for rt in ResourceType::all() {
        if who
            .refusal(&state, &ctx, "GET", rt, None, &Value::Null)
            .await?
            .is_none()
        {
            allowed.push(rt);
        }
    }
    let conn = state.store.connection().await?;
    let counted = count_types(&conn, &allowed, state.settings.counts_max_exact).await?;
    let counts: Vec<Value> = counted
        .iter()
        .map(|c| json!({"type": c.resource_type.name(), "count": c.count, "estimate": c.estimate}))
        .collect();
    Ok(Json(json!({ "counts": counts })).into_response())
}
