//! The storefront and the operations page in a real browser: headless Chromium driven over
//! WebDriver (`chromedriver`), against the real app. Each step leaves a screenshot under
//! `target/browser-artefacts/` for a person to look at.
//!
//! Chromium and chromedriver are Debian's `chromium` and `chromium-driver` (`.ci/run` installs
//! them). Without them these tests fail with that instruction; they never skip, so CI cannot
//! pass without having run them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use holdfast::store::StoreKind;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::helpers::{eventually, spawn_app, spawn_app_with, Options, TestApp, ADMIN_TOKEN};

/// One browser at a time: each is a few hundred MB and a core's worth of work, and the rest
/// of the suite runs beside it.
static ONE_BROWSER: Mutex<()> = Mutex::const_new(());

/// How long a page may take to show what a step expects (CI machines are busy).
const PATIENCE: Duration = Duration::from_secs(30);

const CHROMIUM: &str = "/usr/bin/chromium";

fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A headless Chromium session; chromedriver dies with it.
struct Browser {
    client: Client,
    _driver: Child,
    _profile: TempDir,
    artefacts: PathBuf,
    test: &'static str,
    step: usize,
}

impl Browser {
    async fn open(test: &'static str) -> Browser {
        let chromium =
            find_program(&[CHROMIUM, "/usr/bin/chromium-browser"]).unwrap_or_else(|| {
                panic!("Chromium is required: apt-get install -y chromium chromium-driver")
            });
        let chromedriver = find_program(&["/usr/bin/chromedriver"]).unwrap_or_else(|| {
            panic!("chromedriver is required: apt-get install -y chromium chromium-driver")
        });
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let webdriver = format!("http://127.0.0.1:{port}");
        let status = reqwest::Client::new();
        eventually(30, "chromedriver is ready", || async {
            match status.get(format!("{webdriver}/status")).send().await {
                Ok(resp) => resp
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            }
        })
        .await;
        let profile = TempDir::new().expect("a browser profile dir");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&webdriver)
            .await
            .expect("a WebDriver session");
        let artefacts = artefacts_dir();
        std::fs::create_dir_all(&artefacts).expect("the artefacts dir");
        Browser {
            client,
            _driver: driver,
            _profile: profile,
            artefacts,
            test,
            step: 0,
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("the page loads");
    }

    /// Saves `<test>-<n>-<what>.png` under the artefacts dir.
    async fn screenshot(&mut self, what: &str) {
        self.step += 1;
        let png = self.client.screenshot().await.expect("a screenshot");
        let path = self
            .artefacts
            .join(format!("{}-{}-{what}.png", self.test, self.step));
        std::fs::write(&path, png).expect("save the screenshot");
    }

    async fn click(&self, css: &str) {
        self.visible(css).await;
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.visible(css).await;
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Waits until the element exists and is displayed.
    async fn visible(&self, css: &str) {
        self.text_matches(css, |_| true, "is visible").await;
    }

    /// Waits until the displayed element's text satisfies `check`; returns that text.
    async fn text_matches(&self, css: &str, check: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut last = String::from("<absent>");
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await {
                if element.is_displayed().await.unwrap_or(false) {
                    if let Ok(text) = element.text().await {
                        if check(&text) {
                            return text;
                        }
                        last = text;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {css} never {what}; last text {last:?}",
                self.test
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn local_storage(&self, key: &str) -> Value {
        let raw = self
            .client
            .execute(
                "return localStorage.getItem(arguments[0]);",
                vec![json!(key)],
            )
            .await
            .expect("read localStorage");
        raw.as_str()
            .map(|s| serde_json::from_str(s).expect("stored JSON"))
            .unwrap_or(Value::Null)
    }

    async fn close(self) {
        self.client.close().await.expect("close the session");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn artefacts_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("browser-artefacts")
}

/// A product with a readable name.
async fn tea(app: &TestApp, stock: i64) {
    app.admin_post(
        "/v1/admin/products",
        json!({"sku": "tea-01", "name": "Green Tea", "price": {"amount": 450, "currency": "EUR"},
               "stock": stock}),
    )
    .await
    .assert_status(201);
}

const ADD_TEA: &str = r#"article[data-sku="tea-01"] button[data-role="add"]"#;
const TEA_AVAILABLE: &str = r#"article[data-sku="tea-01"] [data-role="available"]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_adds_to_cart_checks_out_pays_and_sees_the_order_paid() {
    let _one = ONE_BROWSER.lock().await;
    // A short window, so the page's heartbeats are seen to push it within the test.
    let app = spawn_app_with(
        StoreKind::Sqlite,
        Options {
            ttl_seconds: 10,
            ..Options::default()
        },
    )
    .await;
    tea(&app, 5).await;
    let mut browser = Browser::open("paid").await;

    browser.goto(&format!("{}/", app.base)).await;
    browser
        .text_matches(TEA_AVAILABLE, |t| t == "5 available", "shows 5 available")
        .await;
    browser.screenshot("catalogue").await;
    browser.click(ADD_TEA).await;
    browser
        .text_matches(
            "#cart-lines li[data-sku=\"tea-01\"]",
            |t| t.contains("× 1"),
            "holds one tea",
        )
        .await;
    browser.screenshot("cart").await;
    browser.click("#checkout-button").await;
    browser
        .text_matches(
            "#countdown",
            |t| t.len() == 5 && t != "--:--",
            "counts down",
        )
        .await;
    browser.screenshot("checkout").await;

    // The page keeps the hold alive: its heartbeats push `expires_at` forward.
    let customer = browser.local_storage("holdfast.customer").await;
    let token = customer["token"]
        .as_str()
        .expect("a demo customer token")
        .to_owned();
    let checkout = browser.local_storage("holdfast.checkout").await;
    let checkout = checkout.as_str().expect("a live checkout").to_owned();
    let path = format!("/v1/checkouts/{checkout}");
    let first = app.get(&path, Some(&token)).await.str("expires_at");
    eventually(20, "a heartbeat pushes the reservation", || async {
        app.get(&path, Some(&token)).await.str("expires_at") > first
    })
    .await;
    assert_eq!(app.stock_of("tea-01").await, (5, 1, 4));

    browser.click("input[value=\"pm_card_visa\"]").await;
    browser.click("#pay-button").await;
    browser
        .text_matches("#order-status", |t| t == "paid", "shows paid")
        .await;
    browser.screenshot("paid").await;

    assert_eq!(app.stock_of("tea-01").await, (4, 0, 4));
    browser
        .text_matches(TEA_AVAILABLE, |t| t == "4 available", "shows the sale")
        .await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_is_shown_and_the_stock_comes_back() {
    let _one = ONE_BROWSER.lock().await;
    let app = spawn_app(StoreKind::Sqlite).await;
    tea(&app, 10).await;
    let mut browser = Browser::open("declined").await;

    browser.goto(&format!("{}/", app.base)).await;
    browser
        .text_matches(TEA_AVAILABLE, |t| t == "10 available", "shows 10 available")
        .await;
    browser.screenshot("catalogue").await;
    browser.click(ADD_TEA).await;
    browser
        .text_matches(
            "#cart-lines li[data-sku=\"tea-01\"]",
            |t| t.contains("× 1"),
            "holds one tea",
        )
        .await;
    browser.screenshot("cart").await;
    browser.click("#checkout-button").await;
    browser.visible("#pay-button").await;
    browser
        .text_matches(TEA_AVAILABLE, |t| t == "9 available", "shows the unit held")
        .await;
    browser.screenshot("checkout").await;
    assert_eq!(app.stock_of("tea-01").await, (10, 1, 9));
    browser
        .click("input[value=\"pm_card_chargeDeclined\"]")
        .await;
    browser.screenshot("choose-declined-card").await;
    browser.click("#pay-button").await;

    let message = browser
        .text_matches(
            "[data-testid=\"declined\"]",
            |t| t.contains("declined"),
            "says declined",
        )
        .await;
    assert!(message.contains("generic_decline"), "{message}");
    browser
        .text_matches(
            TEA_AVAILABLE,
            |t| t == "10 available",
            "shows the unit back",
        )
        .await;
    browser.screenshot("declined").await;
    assert_eq!(app.stock_of("tea-01").await, (10, 0, 10));
    // The cart is still there to try another card.
    browser
        .text_matches(
            "#cart-lines li[data-sku=\"tea-01\"]",
            |t| t.contains("× 1"),
            "keeps the cart",
        )
        .await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_page_asks_for_the_token_and_follows_the_stock() {
    let _one = ONE_BROWSER.lock().await;
    let app = spawn_app(StoreKind::Sqlite).await;
    tea(&app, 5).await;
    let mut browser = Browser::open("ops").await;
    let reserved = r#"tr[data-sku="tea-01"] td[data-col="reserved"]"#;
    let available = r#"tr[data-sku="tea-01"] td[data-col="available"]"#;

    browser.goto(&format!("{}/ops", app.base)).await;
    browser.visible("#token").await;
    browser.screenshot("login").await;
    browser.type_into("#token", "not-the-admin-token").await;
    browser.click("#login-button").await;
    browser
        .text_matches(
            "[data-testid=\"login-error\"]",
            |t| t.contains("refused"),
            "refuses a wrong token",
        )
        .await;
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.click("#login-button").await;
    browser
        .text_matches(available, |t| t == "5", "shows 5 available")
        .await;
    browser.screenshot("stock-before").await;

    let (ada, checkout, _order) = app.reserved_checkout("Ada", &[("tea-01", 2)]).await;

    browser
        .text_matches(reserved, |t| t == "2", "shows 2 reserved")
        .await;
    browser
        .text_matches(available, |t| t == "3", "shows 3 available")
        .await;
    browser
        .text_matches(
            "#checkouts tr[data-name=\"reserved\"] td.num",
            |t| t == "1",
            "counts the reserved checkout",
        )
        .await;
    browser.screenshot("stock-reserved").await;

    // The sale goes through: the units leave the stock for good.
    let paid = app
        .complete(&ada, &checkout, "pm_card_visa", "ops-pay")
        .await;
    assert_eq!(paid.body["state"], "completed", "{:?}", paid.body);
    let stock = r#"tr[data-sku="tea-01"] td[data-col="stock"]"#;
    browser
        .text_matches(stock, |t| t == "3", "shows the stock down to 3")
        .await;
    browser
        .text_matches(reserved, |t| t == "0", "shows nothing reserved")
        .await;
    browser
        .text_matches(available, |t| t == "3", "shows 3 available")
        .await;
    browser.screenshot("stock-sold").await;
    browser.close().await;
}
