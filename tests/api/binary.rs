//! The built binary as a newcomer runs it: no flags, an empty directory, data that survives a
//! restart, a clean exit on SIGTERM, and one clear line (exit code 2) when it cannot start.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `holdfast` with no flags in `dir`; only the port comes from the environment.
fn start(dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .current_dir(dir)
        .env("HOLDFAST_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("HOLDFAST_DATABASE_URL")
        .env_remove("HOLDFAST_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn holdfast")
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

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    child.wait().expect("holdfast exits")
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

    let admin = std::fs::read_to_string(dir.path().join("holdfast-data/admin-token"))
        .expect("admin token written");
    let admin = admin.trim();
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
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .current_dir(dir)
        .args(args)
        .env_remove("HOLDFAST_DATABASE_URL")
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
    let cases: [(&[&str], &str); 6] = [
        (&["--database-url", "mysql://nope"], "postgres://"),
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
