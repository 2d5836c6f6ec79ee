//! A real etcd (`/usr/bin/etcd`) for tests: single members and 3-member clusters on free
//! loopback ports with temporary data dirs, killed by RAII guards; and `Cut`, a loopback
//! TCP relay that a test can sever to take one gateway off etcd while the others stay on.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{client, eventually, gateway_port};

pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// One etcd member process.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    cluster: String,
    state: &'static str,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Member {
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(ETCD)
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.client_url()])
            .args(["--advertise-client-urls", &self.client_url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.cluster])
            .args(["--initial-cluster-state", self.state])
            .args(["--initial-cluster-token", "hagate-test"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn /usr/bin/etcd (apt-get install etcd-server)");
        self.child = Some(child);
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same ports and data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An etcd cluster of one or more members.
pub struct Etcd {
    pub members: Vec<Member>,
}

impl Etcd {
    /// One member, ready to serve.
    pub async fn start() -> Etcd {
        Self::cluster(1).await
    }

    /// `n` members on loopback, ready to serve.
    pub async fn cluster(n: usize) -> Etcd {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (gateway_port(), gateway_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("n{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, &(c, p))| Member {
                name: format!("n{i}"),
                client_port: c,
                peer_port: p,
                cluster: cluster.clone(),
                state: "new",
                dir: tempfile::tempdir().unwrap(),
                child: None,
            })
            .collect();
        for m in &mut members {
            m.spawn();
        }
        let etcd = Etcd { members };
        etcd.wait_healthy().await;
        etcd
    }

    /// Every running member answers `/health` with a leader.
    pub async fn wait_healthy(&self) {
        let c = client();
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let url = format!("{}/health", m.client_url());
            let what = format!("etcd member {} to be healthy", m.name);
            eventually(&what, Duration::from_secs(30), || {
                let (c, url) = (&c, &url);
                async move {
                    let r = c.get(url).send().await.ok()?;
                    let v: serde_json::Value = r.json().await.ok()?;
                    (v["health"] == "true").then_some(())
                }
            })
            .await;
        }
    }

    /// The client URLs, comma-separated TOML array items: `"http://..", "http://.."`.
    pub fn endpoints_toml(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{:?}", m.client_url()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The client URLs of the running members, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::client_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `etcdctl` against every member; its stdout. Panics if it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(ETCDCTL)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints()))
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A client from the etcd-client crate, for reading history.
    pub async fn client(&self) -> etcd_client::Client {
        let urls: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::client_url)
            .collect();
        etcd_client::Client::connect(urls, None).await.unwrap()
    }

    /// The current revision (retried through a leader election).
    pub async fn revision(&self) -> i64 {
        let c = self.client().await;
        eventually("etcd to answer a read", Duration::from_secs(20), || {
            let mut c = c.clone();
            async move { Some(c.get("/", None).await.ok()?.header()?.revision()) }
        })
        .await
    }

    /// The index of the member that is the raft leader.
    pub async fn leader(&self) -> usize {
        eventually("an etcd leader", Duration::from_secs(20), || async {
            for (i, m) in self.members.iter().enumerate() {
                let Ok(mut c) = etcd_client::Client::connect([m.client_url()], None).await else {
                    continue;
                };
                if let Ok(s) = c.status().await {
                    if s.leader() != 0 && s.leader() == s.header().map_or(0, |h| h.member_id()) {
                        return Some(i);
                    }
                }
            }
            None
        })
        .await
    }
}

/// Writes `n` holder keys `h_000000`... under `prefix`, on one long lease, in txns of 100;
/// each uuid ends with `pad`.
pub async fn write_holder_keys(etcd: &Etcd, prefix: &str, n: usize, pad: &str) {
    let mut c = etcd.client().await;
    let lease = c.lease_grant(600, None).await.unwrap().id();
    let keys: Vec<usize> = (0..n).collect();
    for chunk in keys.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                etcd_client::TxnOp::put(
                    format!("{prefix}/alias/h_{i:06}"),
                    format!(
                        r#"{{"uuid":"uuid-{i:06}{pad}","address":"127.0.0.1:{}"}}"#,
                        20000 + i % 100
                    ),
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
}

/// A `[store]` section for `prefix` on `etcd`, with a snapshot file if given.
pub fn store_toml(etcd: &Etcd, prefix: &str, snapshot: Option<&std::path::Path>) -> String {
    store_toml_at(&etcd.endpoints_toml(), prefix, snapshot)
}

pub fn store_toml_at(endpoints: &str, prefix: &str, snapshot: Option<&std::path::Path>) -> String {
    let snap = snapshot
        .map(|p| format!("snapshot = {:?}\n", p.display().to_string()))
        .unwrap_or_default();
    format!(
        "[store]\nkind = \"etcd\"\nendpoints = [{endpoints}]\nprefix = {prefix:?}\nrequest_timeout = \"1s\"\n{snap}\n"
    )
}

/// A loopback TCP relay to `target` that the test can cut: while cut, open connections are
/// closed and new ones are accepted and closed at once, as a lost network would look to
/// the gateway behind it.
pub struct Cut {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cut {
    pub async fn start(target: SocketAddr) -> Cut {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (c, g) = (cut.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let mut severed = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = severed.changed() => {}
                    }
                });
            }
        });
        Cut {
            addr,
            cut,
            generation,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection through the relay and refuses new ones.
    pub fn sever(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.task.abort();
    }
}
