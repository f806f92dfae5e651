//! The configuration a [`BearerAuthLayer`](super::BearerAuthLayer) shares with its services
//! and their response futures.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::Response;

use super::rejection::Rejection;
use super::verify::Verifier;

/// Decides which requests pass without a token.
pub(crate) type SkipFn = dyn Fn(&Parts) -> bool + Send + Sync;

/// Builds the response to a rejected request in place of the default one.
pub(crate) type RejectFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

/// What a layer built: shared by the layer, every service it makes and their futures.
pub(crate) struct Config {
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) skip: Option<Box<SkipFn>>,
    pub(crate) on_reject: Option<Box<RejectFn>>,
}
