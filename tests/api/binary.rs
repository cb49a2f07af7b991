//! The built binary as a newcomer runs it: no flags, an empty directory, data that survives a
//! restart, a clean exit on SIGTERM and SIGINT, and one clear line (exit code 2) when it cannot
//! start or a flag is bad.
//! `migrate` creates the schema; `audit` reads a store as it is and never migrates it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::Reaped;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The built binary with no `HOLDFAST_*` variable of the test's own environment: only what a
/// test sets reaches it.
fn holdfast() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_holdfast"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HOLDFAST_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Starts `holdfast` with no flags in `dir`; only the port comes from the environment.
fn start(dir: &Path, port: u16) -> Reaped {
    Reaped(
        holdfast()
            .current_dir(dir)
            .env("HOLDFAST_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holdfast"),
    )
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = client.get(format!("{base}/readyz")).send().await {
            if resp.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "holdfast did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `signal` (`TERM`, `INT`) and waits for the process to exit.
fn stop_with(child: &mut Child, signal: &str) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("send the signal");
    assert!(status.success());
    child.wait().expect("holdfast exits")
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    stop_with(child, "TERM")
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

#[tokio::test]
async fn a_newcomer_runs_the_binary_and_finds_the_data_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut child = start(dir.path(), port);
    wait_ready(&client, &base).await;

    let secrets = |file: &str| {
        std::fs::read_to_string(dir.path().join("holdfast-data").join(file))
            .unwrap_or_else(|e| panic!("{file} written: {e}"))
    };
    let first_admin_token = secrets("admin-token");
    let first_webhook_secret = secrets("webhook-secret");
    let admin = first_admin_token.trim();
    let (status, customer) = call(
        &client,
        reqwest::Method::POST,
        format!("{base}/v1/admin/customers"),
        admin,
        Some(json!({"name": "Ada"})),
    )
    .await;
    assert_eq!(status, 201);
    let token = customer["token"].as_str().unwrap().to_owned();
    let (status, _) = call(&client, reqwest::Method::POST, format!("{base}/v1/admin/products"), admin,
        Some(json!({"sku": "tea-01", "name": "Green tea", "price": {"amount": 450, "currency": "EUR"}, "stock": 10}))).await;
    assert_eq!(status, 201);
    let (status, cart) = call(
        &client,
        reqwest::Method::POST,
        format!("{base}/v1/carts"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, 201);
    let cart_id = cart["id"].as_str().unwrap().to_owned();
    let (status, _) = call(
        &client,
        reqwest::Method::PUT,
        format!("{base}/v1/carts/{cart_id}/lines/tea-01"),
        &token,
        Some(json!({"quantity": 2})),
    )
    .await;
    assert_eq!(status, 200);

    let exit = terminate(&mut child);
    assert!(
        exit.success(),
        "SIGTERM ends holdfast with exit code 0, got {exit:?}"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains(&format!("listening on http://127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(stderr.contains("store: sqlite"), "{stderr}");
    assert!(
        stderr.contains("admin-token"),
        "the log says where the admin token is: {stderr}"
    );
    assert!(
        !stderr.contains(admin),
        "the admin token itself is never logged"
    );

    let mut child = start(dir.path(), port);
    wait_ready(&client, &base).await;
    // The secrets were generated once: a restart reads them back, it does not replace them.
    assert_eq!(secrets("admin-token"), first_admin_token);
    assert_eq!(secrets("webhook-secret"), first_webhook_secret);
    let (status, cart) = call(
        &client,
        reqwest::Method::GET,
        format!("{base}/v1/carts/{cart_id}"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, 200, "{cart}");
    assert_eq!(cart["lines"], json!([{"sku": "tea-01", "quantity": 2}]));
    let (status, product) = call(
        &client,
        reqwest::Method::GET,
        format!("{base}/v1/products/tea-01"),
        &token,
        None,
    )
    .await;
    assert_eq!((status, product["available"].as_i64()), (200, Some(10)));
    assert!(terminate(&mut child).success());
}

fn run_failing(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let out = holdfast()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run holdfast");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_start_up_failure_is_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let cases: [(&[&str], &str); 10] = [
        (&["--database-url", "mysql://nope"], "postgres://"),
        // A broker that is down only degrades the start; a URL that cannot work stops it.
        (
            &["--redis-url", "redis://127.0.0.1:99999"],
            "Redis URL is not valid",
        ),
        (
            &["--nats-url", "nats://127.0.0.1:99999"],
            "NATS URL is not valid",
        ),
        (&["--redis-url", "http://127.0.0.1:6379"], "redis-url"),
        (&["--nats-url", "http://127.0.0.1:4222"], "nats-url"),
        (
            &["--database-url", "postgres://root@127.0.0.1:1/none"],
            "cannot open the store",
        ),
        (&["--listen", &busy_addr], "cannot listen on"),
        (
            &["--reservation-ttl-seconds", "0"],
            "reservation-ttl-seconds",
        ),
        (&["--group-max-batch", "0"], "group-max-batch"),
        (&["--group-linger-us", "100001"], "group-linger-us"),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run_failing(args, dir.path());
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let last = lines.last().copied().unwrap_or_default();
        assert!(
            last.starts_with("holdfast: ") && last.contains(expected),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{args:?}: {stderr}"
        );
    }
    drop(busy);
}

/// Runs `holdfast <args>` to its end: exit code, stdout and stderr.
fn run(args: &[&str], dir: &Path) -> (Option<i32>, String, String) {
    let out = holdfast()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run holdfast");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Tables every store has once migrated.
const TABLES: [&str; 7] = [
    "products",
    "stock_adjustments",
    "carts",
    "checkouts",
    "reservations",
    "orders",
    "outbox",
];

async fn postgres_tables(url: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    sqlx::query_scalar("SELECT tablename::TEXT FROM pg_tables WHERE schemaname = 'public'")
        .fetch_all(&pool)
        .await
        .expect("list tables")
}

async fn sqlite_tables(data_dir: &Path) -> Vec<String> {
    let file = data_dir.join("holdfast.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", file.display()))
        .await
        .expect("open");
    sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
        .fetch_all(&pool)
        .await
        .expect("list tables")
}

#[track_caller]
fn assert_has_tables(tables: &[String]) {
    for table in TABLES {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }
}

#[tokio::test]
async fn migrate_creates_the_schema_on_a_fresh_postgres_database_and_an_empty_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::helpers::fresh_postgres_database().await;
    for _ in 0..2 {
        let (code, stdout, stderr) = run(&["migrate", "--database-url", &url], dir.path());
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stdout.contains("migrations applied"), "{stdout}");
    }
    assert_has_tables(&postgres_tables(&url).await);

    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().display().to_string();
    for _ in 0..2 {
        let (code, _, stderr) = run(&["migrate", "--data-dir", &data_dir], dir.path());
        assert_eq!(code, Some(0), "{stderr}");
    }
    assert_has_tables(&sqlite_tables(data.path()).await);
}

/// The one line a failed command ends with (log lines may come before it).
#[track_caller]
fn last_line(stderr: &str) -> &str {
    stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_audit_never_migrates_and_refuses_a_store_that_is_not_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::helpers::fresh_postgres_database().await;
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().display().to_string();
    let stores: [(&[&str], &str); 2] = [
        (&["--database-url", &url], "schema is behind"),
        (&["--data-dir", &data_dir], "no database at"),
    ];
    for (flags, why) in stores {
        let with = |command: &'static str| -> Vec<&str> {
            std::iter::once(command)
                .chain(flags.iter().copied())
                .collect()
        };

        let (code, stdout, stderr) = run(&with("audit"), dir.path());

        assert_eq!(code, Some(2), "{flags:?}: {stdout}{stderr}");
        let line = last_line(&stderr);
        assert!(
            line.starts_with("holdfast: ")
                && line.contains(why)
                && line.contains("holdfast migrate"),
            "{flags:?}: {stderr}"
        );
        assert_eq!(run(&with("migrate"), dir.path()).0, Some(0), "{flags:?}");
        let (code, stdout, stderr) = run(&with("audit"), dir.path());
        assert_eq!(code, Some(0), "{flags:?}: {stdout}{stderr}");
        assert!(stdout.contains("ok    1 no oversell"), "{stdout}");
    }
    // A database one migration behind this binary is refused as well.
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
    )
    .execute(&pool)
    .await
    .expect("forget the last migration");
    let (code, _, stderr) = run(&["audit", "--database-url", &url], dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        last_line(&stderr).contains("migrations applied"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_audit_of_a_store_that_is_not_migrated_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::helpers::fresh_postgres_database().await;
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().display().to_string();

    assert_eq!(
        run(&["audit", "--database-url", &url], dir.path()).0,
        Some(2)
    );
    assert_eq!(
        run(&["audit", "--data-dir", &data_dir], dir.path()).0,
        Some(2)
    );

    assert_eq!(
        postgres_tables(&url).await,
        Vec::<String>::new(),
        "no table created"
    );
    let files: Vec<_> = std::fs::read_dir(data.path()).unwrap().collect();
    assert!(files.is_empty(), "no database file created: {files:?}");
}

#[test]
fn a_bad_flag_or_variable_is_one_line_and_exit_code_2_while_help_and_version_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    // (flags, environment, what the line names)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (&["--listen", "not-an-address"], &[], "--listen"),
        (&[], &[("HOLDFAST_LISTEN", "not-an-address")], "--listen"),
        (
            &[],
            &[("HOLDFAST_DATABASE_URL", "mysql://root@127.0.0.1/shop")],
            "--database-url",
        ),
        (&["--log-format", "xml"], &[], "text, json"),
        (&["--no-such-flag"], &[], "--no-such-flag"),
        (&["audit", "extra"], &[], "extra"),
    ];
    for (flags, vars, named) in cases {
        let out = holdfast()
            .current_dir(dir.path())
            .args(flags)
            .envs(vars.iter().copied())
            .output()
            .expect("run holdfast");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?} {vars:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{flags:?} {vars:?}: exactly one line: {stderr}"
        );
        assert!(
            lines[0].starts_with("holdfast: ") && lines[0].contains(named),
            "{flags:?} {vars:?}: {stderr}"
        );
    }
    for (flags, shows) in [
        (&["--help"][..], "Usage:"),
        (&["audit", "--help"][..], "Usage:"),
        (&["--version"][..], env!("CARGO_PKG_VERSION")),
    ] {
        let out = holdfast()
            .current_dir(dir.path())
            .args(flags)
            .output()
            .expect("run holdfast");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{flags:?}");
        assert!(stdout.contains(shows), "{flags:?}: {stdout}");
    }
}

#[tokio::test]
async fn sigint_stops_the_service_with_exit_code_0_like_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let client = reqwest::Client::new();
    let mut child = start(dir.path(), port);
    wait_ready(&client, &format!("http://127.0.0.1:{port}")).await;

    let exit = stop_with(&mut child, "INT");

    assert!(
        exit.success(),
        "SIGINT ends holdfast with exit code 0, got {exit:?}"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("SIGINT received"), "{stderr}");
    assert!(stderr.contains("holdfast stopped"), "{stderr}");
}

/// A Redis or NATS server of the test's own on `port`, stopped when dropped: the shared
/// servers on 6379 and 4222 are never touched.
fn own_broker(program: &str, args: &[&str]) -> Reaped {
    Reaped(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}")),
    )
}

async fn readiness(client: &reqwest::Client, base: &str) -> (u16, Value) {
    let resp = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

/// Polls `/readyz` until both brokers are up (the reconnect loop found them).
async fn wait_until_brokers_up(client: &reqwest::Client, base: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = readiness(client, base).await;
        if status == 200 && body["status"] == "ready" {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "the brokers never came up: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many messages the stream `name` holds on the NATS server at `url`, once it exists.
async fn stream_messages(url: &str, name: &str) -> u64 {
    let Ok(client) = async_nats::connect(url).await else {
        return 0;
    };
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream(name).await else {
        return 0;
    };
    stream.info().await.map(|i| i.state.messages).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_while_redis_and_nats_are_unreachable_serves_degraded_and_recovers_without_a_restart(
) {
    // Arrange: nothing listens on the Redis and NATS ports yet.
    let dir = tempfile::tempdir().unwrap();
    let (port, redis_port, nats_port) = (free_port(), free_port(), free_port());
    let base = format!("http://127.0.0.1:{port}");
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let stream = format!("hf_test_{}", uuid::Uuid::new_v4().simple());
    let admin = crate::helpers::ADMIN_TOKEN;
    let client = reqwest::Client::new();
    let mut child = Reaped(
        holdfast()
            .current_dir(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis-url", &format!("redis://127.0.0.1:{redis_port}")])
            .args(["--nats-url", &nats_url])
            .args(["--nats-stream", &stream])
            .args(["--nats-subject-prefix", &stream])
            .args(["--relay-interval-ms", "100"])
            .args(["--admin-token", admin])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holdfast"),
    );

    // Act 1: it serves, and says which brokers are down.
    wait_ready(&client, &base).await;
    let (status, ready) = readiness(&client, &base).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["dependencies"]["redis"]["status"], "down", "{ready}");
    assert_eq!(ready["dependencies"]["nats"]["status"], "down", "{ready}");
    let post = |path: &str, token: &str, body: Option<Value>| {
        let (url, token) = (format!("{base}{path}"), token.to_owned());
        let client = client.clone();
        async move { call(&client, reqwest::Method::POST, url, &token, body).await }
    };
    let (status, customer) = post("/v1/admin/customers", admin, Some(json!({"name": "Ada"}))).await;
    assert_eq!(status, 201, "{customer}");
    let buyer = customer["token"].as_str().unwrap().to_owned();
    for sku in ["tea-01", "sale-01"] {
        let product = json!({"sku": sku, "name": "Tea", "price": {"amount": 450, "currency": "EUR"}, "stock": 10});
        assert_eq!(
            post("/v1/admin/products", admin, Some(product)).await.0,
            201
        );
    }
    let (status, cart) = post("/v1/carts", &buyer, None).await;
    assert_eq!(status, 201);
    let cart_id = cart["id"].as_str().unwrap().to_owned();
    let (status, _) = call(
        &client,
        reqwest::Method::PUT,
        format!("{base}/v1/carts/{cart_id}/lines/tea-01"),
        &buyer,
        Some(json!({"quantity": 2})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, checkout) = post("/v1/checkouts", &buyer, Some(json!({"cart_id": cart_id}))).await;
    assert_eq!(status, 201, "{checkout}");
    let checkout_id = checkout["id"].as_str().unwrap().to_owned();
    let completed = client
        .post(format!("{base}/v1/checkouts/{checkout_id}/complete"))
        .bearer_auth(&buyer)
        .header("Idempotency-Key", "degraded-complete")
        .json(&json!({"payment_method": "pm_card_visa"}))
        .send()
        .await
        .expect("complete answers");
    assert_eq!(completed.status().as_u16(), 200);
    let completed: Value = completed.json().await.expect("json");
    assert_eq!(completed["state"], "completed", "{completed}");
    let (status, sale) = post(
        "/v1/admin/flash-sales",
        admin,
        Some(json!({"sku": "sale-01", "units": 3})),
    )
    .await;
    assert_eq!(status, 201, "{sale}");
    let tokens = format!("/v1/flash-sales/{}/tokens", sale["id"].as_str().unwrap());
    let (status, refused) = post(&tokens, &buyer, None).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (503, Some("admission_unavailable")),
        "{refused}"
    );
    let (_, ops) = call(
        &client,
        reqwest::Method::GET,
        format!("{base}/v1/admin/ops"),
        admin,
        None,
    )
    .await;
    assert_eq!(ops["outbox"]["unpublished"], 1, "the event waits: {ops}");
    let down: Vec<&str> = ops["dependencies"]
        .as_array()
        .expect("dependencies on the ops page")
        .iter()
        .filter(|d| d["status"] == "down")
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(down, ["redis", "nats"], "{ops}");

    // Act 2: the brokers come up on those ports.
    let nats_dir = tempfile::tempdir().unwrap();
    let _redis = own_broker(
        "redis-server",
        &[
            "--port",
            &redis_port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    );
    let _nats = own_broker(
        "nats-server",
        &[
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port.to_string(),
            "-js",
            "-sd",
            &nats_dir.path().display().to_string(),
        ],
    );

    // Assert: without a restart, the gate admits and the backlog reaches the stream.
    wait_until_brokers_up(&client, &base).await;
    let (status, token) = post(&tokens, &buyer, None).await;
    assert_eq!(status, 201, "{token}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while stream_messages(&nats_url, &stream).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the order.paid event never reached the stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stream_messages(&nats_url, &stream).await, 1);
    assert!(terminate(&mut child).success());
}
