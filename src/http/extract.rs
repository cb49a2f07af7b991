//! Our own extractors, so every rejection (bad JSON, unknown fields, wrong content type, a body
//! over the limit, a bad query) answers with the contract's error body.

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::ApiError;

/// A JSON body: `application/json` required, unknown fields rejected by the DTOs.
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = is_json(req.headers());
        let bytes = read_body(req, state).await?;
        if !is_json {
            return Err(unsupported_media_type());
        }
        parse(&bytes).map(Self)
    }
}

/// A body that may be empty (meaning `T::default()`) or JSON: for POSTs with no documented
/// body, which accept nothing or `{}` (DESIGN §8).
pub struct OptionalJson<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = is_json(req.headers());
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        if !is_json {
            return Err(unsupported_media_type());
        }
        parse(&bytes).map(Self)
    }
}

/// A JSON body together with its raw bytes (for idempotency fingerprints).
pub struct JsonWithBytes<T>(pub T, pub Bytes);

impl<S, T> FromRequest<S> for JsonWithBytes<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = is_json(req.headers());
        let bytes = read_body(req, state).await?;
        if !is_json {
            return Err(unsupported_media_type());
        }
        let value = parse(&bytes)?;
        Ok(Self(value, bytes))
    }
}

/// The raw body, size-limited, with the contract's 413.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_body(req, state).await.map(Self)
    }
}

pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            super::limits::payload_too_large()
        } else {
            ApiError::bad_request("bad_request", rejection.body_text())
        }
    })
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::validation(e.to_string()),
        _ => ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")),
    })
}

pub(super) fn unsupported_media_type() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send the body as application/json",
    )
}

/// `Path<T>` whose rejections (invalid UTF-8 after percent-decoding, a segment of the wrong
/// type) are [`ApiError`]s, not axum's plain text.
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e: PathRejection| ApiError::bad_request("invalid_path", e.body_text()))
    }
}

/// `Query<T>` whose rejections are [`ApiError`]s.
pub struct AppQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for AppQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request("invalid_query", e.body_text()))
    }
}
