//! A real headless Chromium for the console's tests (installed by `scripts/ensure-chromium`),
//! driven over the DevTools protocol: JSON messages on a WebSocket, a request with an `id`
//! answered with the same `id`, and events (console messages, exceptions) in between. The
//! few commands the tests need are here; a CDP crate would bring thousands of generated
//! bindings (and minutes of build) for them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;
type Sink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// Chromium's binary, installed by `scripts/ensure-chromium` on first use: once per test
/// binary, the tests that start a browser at the same moment wait for that one run (two
/// `apt-get`s at once would fight over dpkg's lock).
fn chromium() -> &'static str {
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ensure-chromium");
        let output = Command::new(script)
            .output()
            .expect("run scripts/ensure-chromium");
        assert!(
            output.status.success(),
            "scripts/ensure-chromium failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    })
}

/// The browser process; killed when dropped.
pub struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium headless with a fresh profile, after making sure it is installed.
    pub fn start() -> Browser {
        let binary = chromium();
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-proxy-server",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-extensions",
                "--disable-sync",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // Chromium says where its DevTools listen on stderr; the rest of stderr is drained
        // by a thread so that the browser never blocks on a full pipe.
        let stderr = child.stderr.take().expect("stderr");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sender = Some(sender);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("DevTools listening on ws://127.0.0.1:") {
                    let port = rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
                    if let (Some(port), Some(sender)) = (port, sender.take()) {
                        let _ = sender.send(port);
                    }
                }
            }
        });
        let port = receiver
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium's DevTools address");
        Browser {
            child,
            port,
            _profile: profile,
        }
    }

    /// The browser's first tab, with its events on, downloads going to `downloads`.
    pub async fn page(&self, downloads: &Path) -> Page {
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
            .await
            .expect("list targets")
            .json()
            .await
            .expect("targets");
        let url = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let page = Page::connect(&url).await;
        page.call("Page.enable", json!({})).await;
        page.call("Runtime.enable", json!({})).await;
        page.call("Log.enable", json!({})).await;
        page.call(
            "Page.setDownloadBehavior",
            json!({"behavior": "allow", "downloadPath": downloads.display().to_string()}),
        )
        .await;
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tab.
pub struct Page {
    sink: tokio::sync::Mutex<Sink>,
    pending: Pending,
    events: Arc<Mutex<Vec<Value>>>,
    next_id: AtomicU64,
}

impl Page {
    async fn connect(url: &str) -> Page {
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect to the page");
        let (sink, mut stream) = socket.split();
        let pending: Pending = Arc::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (answers, seen) = (pending.clone(), events.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(value) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                match value["id"].as_u64() {
                    Some(id) => {
                        if let Some(waiter) = answers.lock().expect("pending").remove(&id) {
                            let _ = waiter.send(value);
                        }
                    }
                    None => seen.lock().expect("events").push(value),
                }
            }
        });
        Page {
            sink: tokio::sync::Mutex::new(sink),
            pending,
            events,
            next_id: AtomicU64::new(1),
        }
    }

    /// Sends a command and waits for its answer's `result` (panics on an error answer).
    pub async fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, sender);
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.sink
            .lock()
            .await
            .send(Message::Text(message.into()))
            .await
            .expect("send to chromium");
        let answer = tokio::time::timeout(Duration::from_secs(60), receiver)
            .await
            .unwrap_or_else(|_| panic!("{method}: no answer in 60 s"))
            .expect("answer");
        assert!(answer["error"].is_null(), "{method}: {}", answer["error"]);
        answer["result"].clone()
    }

    /// Opens `url` and waits until it has loaded.
    pub async fn goto(&self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(30),
        )
        .await;
    }

    /// The value of a JavaScript expression (promises awaited).
    pub async fn eval(&self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Waits (up to a minute) until the expression is truthy, and gives its value.
    pub async fn until(&self, expression: &str) -> Value {
        self.wait_for(expression, Duration::from_secs(60)).await
    }

    /// Waits until the expression is truthy, and gives its value.
    pub async fn wait_for(&self, expression: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let value = self.eval(expression).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if started.elapsed() > timeout {
                self.screenshot("timed-out").await;
                panic!(
                    "waited {timeout:?} for {expression}; the page says: {}",
                    self.eval("document.body.innerText").await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the element `selector` picks.
    pub async fn click(&self, selector: &str) {
        let selector = serde_json::to_string(selector).expect("json");
        self.eval(&format!("document.querySelector({selector}).click()"))
            .await;
    }

    /// Sets an input's (or textarea's) value as typing would, with its `input` event.
    pub async fn fill(&self, selector: &str, text: &str) {
        let selector = serde_json::to_string(selector).expect("json");
        let text = serde_json::to_string(text).expect("json");
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector}); e.value = {text}; \
             e.dispatchEvent(new Event('input', {{bubbles: true}})); }})()"
        ))
        .await;
    }

    /// The text of the element `selector` picks ("" when there is none).
    pub async fn text(&self, selector: &str) -> String {
        let selector = serde_json::to_string(selector).expect("json");
        self.eval(&format!(
            "(document.querySelector({selector}) || {{}}).textContent || ''"
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Saves a PNG of the page as `target/console-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        // Let transitions (a progress bar filling) end: the picture shows the state reached.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("png data"))
            .expect("base64");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// What the page reported as errors: uncaught exceptions, `console.error`, and the
    /// browser's own error entries (a Content-Security-Policy violation, say) except the
    /// network's: a 401 or 403 the test provoked on purpose is logged there too.
    pub fn errors(&self) -> Vec<String> {
        self.events
            .lock()
            .expect("events")
            .iter()
            .filter_map(|event| {
                let params = &event["params"];
                match event["method"].as_str()? {
                    "Runtime.exceptionThrown" => Some(params["exceptionDetails"].to_string()),
                    "Runtime.consoleAPICalled"
                        if matches!(params["type"].as_str(), Some("error" | "assert")) =>
                    {
                        Some(params["args"].to_string())
                    }
                    "Log.entryAdded"
                        if params["entry"]["level"] == "error"
                            && params["entry"]["source"] != "network" =>
                    {
                        Some(params["entry"].to_string())
                    }
                    _ => None,
                }
            })
            .collect()
    }
}
