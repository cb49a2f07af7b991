//! `/openapi.json` is the contract as the code states it: every route the router serves is in
//! the document and every path in the document is served, so a route added without
//! documentation (or documentation left behind by a removed route) fails here. The served
//! routes are read from the `.route(...)` calls under `src/http/`, the one place routes are
//! declared, and each documented operation is then asked of the running router.

use std::collections::BTreeSet;
use std::path::Path;

use holdfast::store::StoreKind;
use reqwest::Method;
use serde_json::Value;

use crate::helpers::spawn_app;

const METHODS: [&str; 7] = ["get", "post", "put", "patch", "delete", "head", "options"];

/// Every `(method, path)` declared by a `.route("path", get(..).post(..))` call in the files
/// under `dir`.
fn declared_routes(dir: &Path) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    let mut files = vec![dir.to_owned()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read src/http") {
                files.push(entry.expect("a directory entry").path());
            }
            continue;
        }
        if path.extension().is_some_and(|e| e == "rs") {
            let source = std::fs::read_to_string(&path).expect("read a source file");
            assert!(
                !source.contains(".nest(") && !source.contains(".route_service("),
                "{}: nested routers are not understood by this test; declare routes with .route()",
                path.display()
            );
            routes.extend(routes_in(&source));
        }
    }
    routes
}

fn routes_in(source: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let call = balanced(rest);
        let path = call
            .split('"')
            .nth(1)
            .expect("a route's first argument is a string literal")
            .to_owned();
        let handlers = &call[call.find(',').expect("a route has a method router")..];
        for method in METHODS {
            let mut search = handlers;
            while let Some(i) = search.find(&format!("{method}(")) {
                let before = search[..i].chars().last();
                if matches!(before, Some(c) if c.is_alphanumeric() || c == '_') {
                    search = &search[i + 1..];
                    continue;
                }
                found.push((method.to_owned(), path.clone()));
                break;
            }
        }
    }
    found
}

/// The text up to the parenthesis closing the one opened just before `text`.
fn balanced(text: &str) -> &str {
    let mut depth = 1;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[..i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced .route( call")
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for method in METHODS {
            if item.get(method).is_some() {
                routes.insert((method.to_owned(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn the_route_reader_finds_chained_methods_and_ignores_look_alikes() {
    let source = r#"
        Router::new()
            .route("/a/{id}", patch(update_product).get(get_product))
            .route("/b", post(target_get_thing))
    "#;

    let routes = routes_in(source);

    assert_eq!(
        routes,
        vec![
            ("get".to_owned(), "/a/{id}".to_owned()),
            ("patch".to_owned(), "/a/{id}".to_owned()),
            ("post".to_owned(), "/b".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_the_router_serves_is_documented_and_every_documented_route_is_served() {
    let app = spawn_app(StoreKind::Sqlite).await;
    let declared = declared_routes(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http"));

    let resp = app.get("/openapi.json", None).await;

    resp.assert_status(200);
    let documented = documented_routes(&resp.body);
    let undocumented: Vec<_> = declared.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&declared).collect();
    assert!(
        undocumented.is_empty(),
        "routes without documentation (add #[utoipa::path] and list them in ApiDoc): {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not declared: {unserved:?}"
    );
    assert!(
        declared.len() >= 29,
        "the reader found too few routes: {declared:?}"
    );
    // The router itself answers each documented operation: never the fallback's 404 nor 405.
    for (method, path) in &documented {
        let concrete = path
            .split('/')
            .map(|s| if s.starts_with('{') { "x" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
        let answer = app
            .client
            .request(method.clone(), format!("{}{concrete}", app.base))
            .send()
            .await
            .expect("the app answers");
        let status = answer.status().as_u16();
        let body: Value = answer.json().await.unwrap_or(Value::Null);
        let code = body["error"]["code"].as_str().unwrap_or("");
        assert!(
            code != "route_not_found" && code != "method_not_allowed",
            "{method} {concrete} is documented but the router answered {status} {code}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_well_formed_openapi_3() {
    let app = spawn_app(StoreKind::Sqlite).await;

    let resp = app.get("/openapi.json", None).await;

    resp.assert_status(200);
    let doc = &resp.body;
    let version = doc["openapi"].as_str().expect("an openapi version");
    assert!(version.starts_with("3."), "version {version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes");
    for scheme in ["admin_token", "customer_token"] {
        assert_eq!(schemes[scheme]["type"], "http");
        assert_eq!(schemes[scheme]["scheme"], "bearer");
    }
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(
        error["properties"]["error"]["$ref"], "#/components/schemas/ErrorDetail",
        "the shared error body: {error}"
    );
    let mut operation_ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let at = format!("{method} {path}");
            assert!(METHODS.contains(&method.as_str()), "{at}: unknown method");
            let id = operation["operationId"].as_str().expect("an operationId");
            assert!(
                operation_ids.insert(id.to_owned()),
                "{at}: duplicate operationId {id}"
            );
            let responses = operation["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{at}: no responses");
            for status in responses.keys() {
                assert!(
                    status == "default"
                        || status.parse::<u16>().is_ok_and(|s| (100..600).contains(&s)),
                    "{at}: response key {status}"
                );
            }
            // Every `{name}` of the template is a required path parameter, and no other is.
            let in_template: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            let parameters = operation["parameters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let declared: BTreeSet<String> = parameters
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(p["required"], true, "{at}: path parameter not required");
                    p["name"].as_str().expect("a parameter name").to_owned()
                })
                .collect();
            let in_template: BTreeSet<String> =
                in_template.into_iter().map(str::to_owned).collect();
            assert_eq!(declared, in_template, "{at}: path parameters");
            // Admin routes say they need the admin token.
            if path.starts_with("/v1/admin/") {
                assert_eq!(
                    operation["security"][0]["admin_token"],
                    Value::Array(vec![]),
                    "{at}: admin security"
                );
            }
            if let Some(security) = operation["security"].as_array() {
                for requirement in security {
                    for name in requirement.as_object().expect("a requirement").keys() {
                        assert!(schemes.contains_key(name), "{at}: unknown scheme {name}");
                    }
                }
            }
        }
    }
    // Every reference points at a schema that exists.
    let mut refs = Vec::new();
    collect_refs(doc, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("a reference outside the schemas: {reference}"));
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "dangling reference {reference}"
        );
    }
}

fn collect_refs(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                if key == "$ref" {
                    into.push(v.as_str().expect("a $ref is a string").to_owned());
                } else {
                    collect_refs(v, into);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, into)),
        _ => {}
    }
}
