//! Schema-driven fuzzing of the whole API with schemathesis against our own `/openapi.json`
//! (promise 7): thousands of generated requests, valid and invalid, on every operation. No
//! answer may be a 5xx, every answer must be one the document declares, with the declared
//! content type, headers and body schema, schema-invalid requests must be refused with a 4xx,
//! and the promises must still hold afterwards.
//!
//! Schemathesis is a Python tool (PyPI); no Rust crate does schema-driven API fuzzing, so the
//! suite installs a pinned version into a virtual environment under the target directory the
//! first time it runs (`HOLDFAST_SCHEMATHESIS` may point at an existing `st` instead).
//! Generated ids would almost never name a real cart, checkout or order, so the run is given
//! dictionaries of real ones, seeded here, for most of its draws.

use std::path::{Path, PathBuf};

use holdfast::store::StoreKind;
use serde_json::json;
use tokio::process::Command;
use tokio::sync::OnceCell;

use crate::helpers::{spawn_app, AssertClean, ADMIN_TOKEN};

const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Test cases per operation and phase: enough to reach every documented answer, short enough
/// for CI on two cores.
const MAX_EXAMPLES: &str = "60";
/// Checks that hold for this API. Left out: `positive_data_acceptance`, because the document's
/// schemas are looser than the domain's parsing (a SKU's alphabet, a name's length) and such a
/// request is rightly refused with a 4xx; `missing_required_header`, because a PATCH without
/// `If-Match` answers `428 precondition_required` as the contract says, which schemathesis
/// does not count among the refusals it expects.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
    response_headers_conformance,response_schema_conformance,negative_data_rejection,\
    use_after_free,ensure_resource_availability,ignored_auth,unsupported_method";

/// The `st` command (or `python -m schemathesis.cli`), installed once per target directory.
async fn schemathesis() -> &'static [String] {
    static COMMAND: OnceCell<Vec<String>> = OnceCell::const_new();
    COMMAND
        .get_or_init(|| async {
            if let Ok(st) = std::env::var("HOLDFAST_SCHEMATHESIS") {
                return vec![st];
            }
            let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("schemathesis-venv");
            if !venv.join("bin/python").exists() {
                install(&venv).await;
            }
            vec![
                venv.join("bin/python").display().to_string(),
                "-m".into(),
                "schemathesis.cli".into(),
            ]
        })
        .await
}

/// Builds the virtual environment beside its final place and renames it in, so a second test
/// process never sees a half-installed one (`python -m` works from a moved venv).
async fn install(venv: &Path) {
    let scratch = venv.with_file_name(format!("schemathesis-venv-{}", uuid::Uuid::new_v4()));
    run_ok("python3", &["-m", "venv", &scratch.display().to_string()]).await;
    let pip = scratch.join("bin/pip").display().to_string();
    run_ok(
        &pip,
        &[
            "install",
            "--quiet",
            "--disable-pip-version-check",
            SCHEMATHESIS,
        ],
    )
    .await;
    if std::fs::rename(&scratch, venv).is_err() {
        // Another process got there first; its environment is as good as ours.
        let _ = std::fs::remove_dir_all(&scratch);
    }
}

async fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} must be runnable to install schemathesis: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed (python3 with venv and access to PyPI are needed):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the run is told about: real ids for most draws of each identifier.
struct Seeded {
    customer_token: String,
    skus: Vec<String>,
    carts: Vec<String>,
    checkouts: Vec<String>,
    orders: Vec<String>,
    sales: Vec<String>,
}

async fn seed(app: &crate::helpers::TestApp) -> Seeded {
    for (sku, stock) in [("fz-tea", 1000), ("fz-mug", 1000), ("fz-sale", 50)] {
        app.new_product(sku, 450, stock).await;
    }
    let customer = app.new_customer("Fuzzing customer").await;
    let mut carts = Vec::new();
    let mut checkouts = Vec::new();
    let mut orders = Vec::new();
    for i in 0..4 {
        let cart = app.new_cart(&customer).await;
        app.set_line(&customer, &cart, "fz-tea", 1 + i)
            .await
            .assert_status(200);
        app.set_line(&customer, &cart, "fz-mug", 1)
            .await
            .assert_status(200);
        let started = app.start_checkout(&customer, &cart).await;
        started.assert_status(201);
        let (checkout, order) = (started.str("id"), started.str("order_id"));
        if i < 2 {
            app.complete(&customer, &checkout, "pm_card_visa", &format!("seed-{i}"))
                .await
                .assert_status(200);
        }
        checkouts.push(checkout);
        orders.push(order);
        carts.push(cart);
    }
    let open_cart = app.new_cart(&customer).await;
    app.set_line(&customer, &open_cart, "fz-tea", 2)
        .await
        .assert_status(200);
    carts.push(open_cart);
    let sale = app
        .admin_post(
            "/v1/admin/flash-sales",
            json!({"sku": "fz-sale", "units": 10}),
        )
        .await;
    sale.assert_status(201);
    Seeded {
        customer_token: customer.token,
        skus: vec!["fz-tea".into(), "fz-mug".into(), "fz-sale".into()],
        carts,
        checkouts,
        orders,
        sales: vec![sale.str("id")],
    }
}

fn toml_list(values: &[String]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The run's configuration: each bearer scheme of the document gets its token, and each
/// identifier a dictionary of real ones drawn most of the time (the rest stays generated, so
/// unknown and malformed ids are fuzzed too).
fn config(seeded: &Seeded) -> String {
    let bind = |operations: &[&str], bindings: &[(&str, &str)]| {
        let ids: Vec<String> = operations.iter().map(|o| format!("{o:?}")).collect();
        let params: Vec<String> = bindings
            .iter()
            .map(|(key, dictionary)| {
                format!("{key:?} = {{ dictionary = {dictionary:?}, probability = 0.8 }}")
            })
            .collect();
        format!(
            "[[operations]]\ninclude-operation-id = [{}]\nparameters = {{ {} }}\n\n",
            ids.join(", "),
            params.join(", ")
        )
    };
    let mut toml = format!(
        "[auth.openapi.admin_token]\nbearer = {ADMIN_TOKEN:?}\n\
         [auth.openapi.customer_token]\nbearer = {:?}\n\n\
         [dictionaries.skus]\nvalues = {}\n\
         [dictionaries.carts]\nvalues = {}\n\
         [dictionaries.checkouts]\nvalues = {}\n\
         [dictionaries.orders]\nvalues = {}\n\
         [dictionaries.sales]\nvalues = {}\n\
         [dictionaries.cards]\nvalues = {}\n\n",
        seeded.customer_token,
        toml_list(&seeded.skus),
        toml_list(&seeded.carts),
        toml_list(&seeded.checkouts),
        toml_list(&seeded.orders),
        toml_list(&seeded.sales),
        toml_list(&[
            "pm_card_visa".into(),
            "pm_card_chargeDeclined".into(),
            "pm_card_authenticationRequired".into(),
        ]),
    );
    toml += &bind(
        &["get_product", "update_product", "get_catalogue_product"],
        &[("path.sku", "skus")],
    );
    toml += &bind(&["get_cart"], &[("path.id", "carts")]);
    toml += &bind(
        &["set_cart_line", "remove_cart_line"],
        &[("path.id", "carts"), ("path.sku", "skus")],
    );
    toml += &bind(&["start_checkout"], &[("body.cart_id", "carts")]);
    toml += &bind(
        &["get_checkout", "cancel_checkout", "heartbeat_checkout"],
        &[("path.id", "checkouts")],
    );
    toml += &bind(
        &["complete_checkout"],
        &[("path.id", "checkouts"), ("body.payment_method", "cards")],
    );
    toml += &bind(
        &["get_order", "refund_order", "ship_order"],
        &[("path.id", "orders")],
    );
    toml += &bind(
        &["get_flash_sale", "take_flash_sale_token"],
        &[("path.id", "sales")],
    );
    toml += &bind(&["open_flash_sale"], &[("body.sku", "skus")]);
    toml
}

async fn schemathesis_finds_no_fault_in_the_api(kind: StoreKind) {
    // Arrange
    let command = schemathesis().await;
    let app = spawn_app(kind).await;
    let seeded = seed(&app).await;
    let dir = tempfile::TempDir::new().expect("temp dir");
    let config_file: PathBuf = dir.path().join("schemathesis.toml");
    std::fs::write(&config_file, config(&seeded)).expect("write the schemathesis config");

    // Act
    let out = Command::new(&command[0])
        .args(&command[1..])
        .arg("--config-file")
        .arg(&config_file)
        .args(["run", &format!("{}/openapi.json", app.base)])
        .args(["--checks", CHECKS, "--max-examples", MAX_EXAMPLES])
        .args(["--workers", "2", "--no-color"])
        .current_dir(dir.path())
        .output()
        .await
        .expect("schemathesis runs");

    // Assert
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "schemathesis found faults on {kind:?}:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("passed"),
        "schemathesis ran no test case:\n{report}"
    );
    app.audit().await.assert_clean();
}

crate::both_stores!(schemathesis_finds_no_fault_in_the_api);
