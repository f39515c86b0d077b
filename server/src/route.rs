//! The server's routes as an enum, parsed once from a request's method and path: which route,
//! or why none (404, or 405 with the `Allow` header's value, RFC 9110 section 15.5.6).
//!
//! Invariant: every route that takes GET also takes HEAD (answered as GET without a body).

use hyper::Method;

use crate::error::ApiError;

/// One route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Completions,
    ChatCompletions,
    Models,
    Health,
    Metrics,
    OpenApi,
}

impl Route {
    pub const ALL: [Route; 6] = [
        Route::Completions,
        Route::ChatCompletions,
        Route::Models,
        Route::Health,
        Route::Metrics,
        Route::OpenApi,
    ];

    /// The path (also the `route` label of the HTTP metrics).
    pub fn path(self) -> &'static str {
        match self {
            Route::Completions => "/v1/completions",
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Models => "/v1/models",
            Route::Health => "/health",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
        }
    }

    pub fn from_path(path: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.path() == path)
    }

    /// Whether the route takes a request body (POST) or is read (GET and HEAD).
    pub fn is_post(self) -> bool {
        matches!(self, Route::Completions | Route::ChatCompletions)
    }

    /// The methods it takes, as the `Allow` header lists them.
    pub fn allow(self) -> &'static str {
        if self.is_post() {
            "POST"
        } else {
            "GET, HEAD"
        }
    }

    pub fn takes(self, method: &Method) -> bool {
        if self.is_post() {
            method == Method::POST
        } else {
            method == Method::GET || method == Method::HEAD
        }
    }

    /// The route of a request: `Err` is the 404 or 405 to answer, with the route when the path
    /// was one (for the metrics).
    pub fn parse(method: &Method, path: &str) -> Result<Route, (Option<Route>, ApiError)> {
        let Some(route) = Route::from_path(path) else {
            return Err((None, ApiError::not_found(path)));
        };
        if !route.takes(method) {
            let e = ApiError::method_not_allowed(method.as_str(), path, route.allow());
            return Err((Some(route), e));
        }
        Ok(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_method_and_path() {
        for r in Route::ALL {
            assert_eq!(Route::from_path(r.path()), Some(r));
            let method = if r.is_post() {
                Method::POST
            } else {
                Method::GET
            };
            assert_eq!(Route::parse(&method, r.path()).ok(), Some(r));
        }
        assert_eq!(
            Route::parse(&Method::HEAD, "/health").ok(),
            Some(Route::Health)
        );
        let (route, e) = Route::parse(&Method::GET, "/v1/completions").unwrap_err();
        assert_eq!(route, Some(Route::Completions));
        assert_eq!(e.status, hyper::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(e.allow, Some("POST"));
        let (_, e) = Route::parse(&Method::DELETE, "/metrics").unwrap_err();
        assert_eq!(e.allow, Some("GET, HEAD"));
        let (route, e) = Route::parse(&Method::GET, "/v1/completions/").unwrap_err();
        assert_eq!((route, e.status), (None, hyper::StatusCode::NOT_FOUND));
    }
}
