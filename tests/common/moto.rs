//! A local S3-compatible server for tests: moto (`moto[server]`, installed into .venv by
//! `make setup`), started on a free loopback port and stopped when dropped. No network needed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use modelpress::config::{Config, Secret};

pub struct Moto {
    child: Child,
    pub endpoint: String,
    http: reqwest::Client,
}

impl Moto {
    pub async fn start() -> Moto {
        let exe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
        assert!(
            exe.exists(),
            "{} is missing: run `make setup` (scripts/requirements.txt installs moto[server])",
            exe.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let start = Instant::now();
        while moto.http.get(&moto.endpoint).send().await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto did not start on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }

    pub async fn create_bucket(&self, bucket: &str) {
        let r = self
            .http
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "creating bucket {bucket}: {}", r.status());
    }

    /// Points a configuration at `bucket` on this server.
    pub fn configure(&self, config: &mut Config, bucket: &str) {
        config.storage.backend = "s3".into();
        config.storage.endpoint = self.endpoint.clone();
        config.storage.bucket = bucket.into();
        config.storage.allow_http = true;
        config.storage.access_key_id = "testing".into();
        config.storage.secret_access_key = Secret("testing".into());
    }

    /// The same settings as environment variables, for processes the test starts.
    pub fn env(&self, bucket: &str) -> Vec<(String, String)> {
        [
            ("MODELPRESS_STORAGE__BACKEND", "s3"),
            ("MODELPRESS_STORAGE__ENDPOINT", &self.endpoint),
            ("MODELPRESS_STORAGE__BUCKET", bucket),
            ("MODELPRESS_STORAGE__ALLOW_HTTP", "true"),
            ("MODELPRESS_STORAGE__ACCESS_KEY_ID", "testing"),
            ("MODELPRESS_STORAGE__SECRET_ACCESS_KEY", "testing"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Every key in the bucket, sorted, read with plain S3 ListObjectsV2 requests (not through
    /// the service's own storage code).
    pub async fn keys(&self, bucket: &str) -> Vec<String> {
        self.objects(bucket).await.into_iter().map(|(k, _)| k).collect()
    }

    /// Every (key, ETag) in the bucket, sorted by key. A multipart upload's ETag ends in
    /// `-<parts>`.
    pub async fn objects(&self, bucket: &str) -> Vec<(String, String)> {
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!("{}/{bucket}?list-type=2", self.endpoint);
            if let Some(t) = &token {
                url.push_str(&format!("&continuation-token={}", urlencode(t)));
            }
            let r = self.http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200, "listing {bucket}");
            let body = r.text().await.unwrap();
            for contents in elements(&body, "Contents") {
                let key = elements(&contents, "Key").remove(0);
                let etag = elements(&contents, "ETag").remove(0);
                objects.push((key, etag.trim_matches('"').to_string()));
            }
            token = elements(&body, "NextContinuationToken").into_iter().next();
            if token.is_none() {
                break;
            }
        }
        objects.sort();
        objects
    }

    pub async fn etag(&self, bucket: &str, key: &str) -> String {
        let objects = self.objects(bucket).await;
        let found = objects.into_iter().find(|(k, _)| k == key);
        found.unwrap_or_else(|| panic!("{key} is not in {bucket}")).1
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn elements(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| {
            rest.split_once(&close)
                .map(|(v, _)| v.replace("&quot;", "\"").replace("&amp;", "&"))
        })
        .collect()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
