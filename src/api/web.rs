//! The demo web page (DESIGN §7) and the browser client library it is
//! built on, embedded in the binary so `GET /` works with no web server
//! or build step beside it.

use hyper::StatusCode;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use serde_json::json;

use crate::http::{self, HttpResponse};

/// One embedded file.
pub struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_str!("../../web/demo/index.html"),
    content_type: "text/html; charset=utf-8",
};
const SCRIPT: Asset = Asset {
    body: include_str!("../../web/demo/demo.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE: Asset = Asset {
    body: include_str!("../../web/demo/demo.css"),
    content_type: "text/css; charset=utf-8",
};
const CLIENT: Asset = Asset {
    body: include_str!("../../clients/js/otako.js"),
    content_type: "text/javascript; charset=utf-8",
};

/// The embedded file at `/<name>`, if there is one.
pub fn asset(name: &str) -> Option<&'static Asset> {
    match name {
        "" | "index.html" => Some(&INDEX),
        "demo.js" => Some(&SCRIPT),
        "demo.css" => Some(&STYLE),
        "otako.js" => Some(&CLIENT),
        _ => None,
    }
}

/// The file, not cached (a rebuilt binary serves the new page at once).
pub fn serve(asset: &Asset) -> HttpResponse {
    let mut response = http::text(StatusCode::OK, asset.body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /config.json`: where the page's client connects.
pub fn config(gateway_url: &str) -> HttpResponse {
    http::json(StatusCode::OK, &json!({"gateway_url": gateway_url}))
}
