//! The web client, served by the gateway on its gRPC port: the bundle from
//! `deploy/build-web.sh` (`index.html`, the `.js` glue, the `.wasm`) at `/`, and the API
//! as gRPC-web (`tonic_web::GrpcWebLayer`, HTTP/1.1 accepted) beside native gRPC. One
//! origin for both, so the browser needs no CORS and the page's Content-Security-Policy
//! lets it talk only to this gateway.
//!
//! Only plain file names directly in the bundle directory are served (no `..`, no
//! sub-directories, no dot files); `GET /` is `index.html`. A file with a `.gz` twin is
//! sent compressed to browsers that accept gzip.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::service::Routes;
use tower::{Layer, Service};

/// What the page may load and talk to: itself only. `wasm-unsafe-eval` lets it compile
/// its WebAssembly; inline styles are the page's own.
const CSP: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; \
                   style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
                   frame-ancestors 'none'";

/// `grpc` plus `GET /` and `GET /<file>` from `dir`. The gRPC paths have two segments
/// (`/mp.v1.QueueService/Lease`), the bundle's one, so the two never meet.
pub fn with_bundle(grpc: Routes, dir: Option<PathBuf>) -> Routes {
    let index_dir = dir.clone();
    let router = grpc
        .into_axum_router()
        .route(
            "/",
            axum::routing::get(move |headers: HeaderMap| {
                let dir = index_dir.clone();
                async move { serve(dir.as_deref(), "index.html", &headers).await }
            }),
        )
        .route(
            "/{file}",
            axum::routing::get(move |uri: Uri, headers: HeaderMap| {
                let dir = dir.clone();
                async move {
                    let name = uri.path().trim_start_matches('/').to_string();
                    serve(dir.as_deref(), &name, &headers).await
                }
            }),
        );
    Routes::from(router)
}

/// gRPC-web for gRPC-web requests, everything else straight to the routes.
///
/// `tonic_web::GrpcWebLayer` alone answers 400 to any HTTP/1.1 request that is not gRPC-web
/// — a browser's `GET /` for the page — so requests are split by their content type first:
/// gRPC-web ones go through the translation, the rest (native gRPC over HTTP/2, the bundle's
/// files) reach the routes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcWebOrPlain;

impl Layer<Routes> for GrpcWebOrPlain {
    type Service = Split;

    fn layer(&self, routes: Routes) -> Split {
        Split {
            web: tonic_web::GrpcWebLayer::new().layer(routes.clone()),
            plain: routes,
        }
    }
}

#[derive(Clone)]
pub struct Split {
    web: tonic_web::GrpcWebService<Routes>,
    plain: Routes,
}

fn is_grpc_web(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc-web"))
}

type Reply = Response<tonic::body::Body>;

impl Service<Request<tonic::body::Body>> for Split {
    type Response = Reply;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both wrap the same (always ready) router.
        match Service::<Request<tonic::body::Body>>::poll_ready(&mut self.web, cx) {
            Poll::Ready(Ok(())) => {
                Service::<Request<tonic::body::Body>>::poll_ready(&mut self.plain, cx)
            }
            other => other,
        }
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        if is_grpc_web(req.headers()) {
            Box::pin(self.web.call(req))
        } else {
            Box::pin(self.plain.call(req))
        }
    }
}

/// Is `name` a plain file name we may serve?
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css; charset=utf-8",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn serve(dir: Option<&Path>, name: &str, headers: &HeaderMap) -> Response<Body> {
    let Some(dir) = dir else {
        return text(
            StatusCode::NOT_FOUND,
            "This gateway serves no web client: build it with deploy/build-web.sh and set \
             web_dir (MP_WEB_DIR) to its output. `deploy/mp up` does both.\n",
        );
    };
    if !plain_name(name) {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    let gzip_ok = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let plain = dir.join(name);
    let (bytes, gzipped) = match gzip_ok {
        true => match tokio::fs::read(dir.join(format!("{name}.gz"))).await {
            Ok(b) => (Ok(b), true),
            Err(_) => (tokio::fs::read(&plain).await, false),
        },
        false => (tokio::fs::read(&plain).await, false),
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let why = if name == "index.html" {
                format!(
                    "The web client is not built in {}: run deploy/build-web.sh.\n",
                    dir.display()
                )
            } else {
                "not found\n".to_string()
            };
            return text(StatusCode::NOT_FOUND, &why);
        }
        Err(e) => {
            tracing::warn!(file = %plain.display(), error = %e, "web bundle file unreadable");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "unreadable\n");
        }
    };
    let mut r = Response::new(Body::from(bytes));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(name)),
    );
    // The names carry no hash: the browser revalidates, so a rebuilt bundle is seen at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if gzipped {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_served() {
        for ok in [
            "index.html",
            "mp_client_bg.wasm",
            "mp_client.js",
            "start.js",
        ] {
            assert!(plain_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".env",
            "..",
            "../etc/passwd",
            "a/b",
            "a%2fb",
            "x\\y",
            "é.js",
        ] {
            assert!(!plain_name(bad), "{bad}");
        }
        assert_eq!(content_type("mp_client_bg.wasm"), "application/wasm");
        assert_eq!(content_type("README"), "application/octet-stream");
    }
}
