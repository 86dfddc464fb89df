//! The four release binaries as separate processes, exporting traces to the test's receiver, with
//! order-service's broker link through a proxy that the test can cut, and any one of them killed
//! (`SIGKILL`) and started again on its port and database file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a service may take to become ready: a release binary starts in milliseconds and
/// connects to a local broker in well under a second; 30 s only expires when something is broken.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a service may take to exit after SIGTERM: its drain and the trace flush take about a
/// second; 30 s only expires when shutdown hangs.
const EXIT_WITHIN: Duration = Duration::from_secs(30);
/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(50);

/// The consumer queues the services declare (names as in each service's `messaging` module).
const QUEUES: [&str; 3] = [
    "order.price-events",
    "inventory.order-events",
    "pricing.order-events",
];

/// The broker the services talk to (`AMQP_URL`, else the development broker).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Where `cargo build --release` put the binaries.
pub fn release_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("release")
}

/// A running service process, and how to start it again.
pub struct Service {
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
    child: Child,
    binary: PathBuf,
    env: Vec<(String, String)>,
}

impl Service {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// What to start: which database each service keeps its state in, and how many replicas of
/// pricing, inventory and order (the gateway is one process).
pub struct Layout<'a> {
    /// Trace export: the OTLP endpoint and the milliseconds between batch exports.
    pub otlp: Option<(&'a str, u64)>,
    /// The broker URL order-service is given (a proxy the test can cut, or the broker).
    pub order_amqp_url: &'a str,
    /// Processes of each of pricing, inventory and order.
    pub replicas: usize,
    /// `DATABASE_URL` of each service by name (`"order"`, …): `None` for a SQLite file each.
    pub postgres: Option<&'a dyn Fn(&str) -> String>,
    /// Further environment variables, as `(service, name, value)`.
    pub extra: &'a [(&'a str, &'a str, &'a str)],
}

/// The services, each on its own loopback port and database, in a broker namespace of their own.
pub struct Stack {
    pub services: Vec<Service>,
    pub namespace: String,
    workdir: PathBuf,
}

impl Stack {
    /// Starts pricing, inventory, order (its broker link through `order_amqp_url`) and the gateway,
    /// exporting traces to `otlp` (endpoint, milliseconds between batch exports) when given, and
    /// waits until each is ready.
    pub async fn start(otlp: Option<(&str, u64)>, order_amqp_url: &str) -> Self {
        Self::start_with(otlp, order_amqp_url, &[]).await
    }

    /// [`Stack::start`], with `extra` environment variables as `(service, name, value)`.
    pub async fn start_with(
        otlp: Option<(&str, u64)>,
        order_amqp_url: &str,
        extra: &[(&str, &str, &str)],
    ) -> Self {
        Self::start_layout(Layout {
            otlp,
            order_amqp_url,
            replicas: 1,
            postgres: None,
            extra,
        })
        .await
    }

    /// Starts the stack `layout` describes and waits until every process is ready. With more
    /// than one replica, pricing, inventory and order run as `<name>-1`, `<name>-2`, …, and every
    /// caller is given the list of all replicas' URLs (comma-separated, as the binaries take it).
    pub async fn start_layout(layout: Layout<'_>) -> Self {
        assert!(
            layout.replicas == 1 || layout.postgres.is_some(),
            "replicas share their state: more than one needs PostgreSQL"
        );
        let namespace = format!("trace-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let workdir = std::env::temp_dir().join(&namespace);
        std::fs::create_dir_all(&workdir).expect("creates the work directory");
        let plan = [
            ("pricing", "pricing-service", layout.replicas),
            ("inventory", "inventory-service", layout.replicas),
            ("order", "order-service", layout.replicas),
            ("gateway", "gateway", 1),
        ];
        let ports: Vec<Vec<u16>> = plan
            .iter()
            .map(|(_, _, n)| (0..*n).map(|_| free_port()).collect())
            .collect();
        let urls = |i: usize| {
            ports[i]
                .iter()
                .map(|port| format!("http://127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut services = Vec::new();
        for (i, (name, binary, replicas)) in plan.into_iter().enumerate() {
            let path = release_dir().join(binary);
            assert!(
                path.exists(),
                "{} is missing: run `cargo build --release` first",
                path.display()
            );
            let amqp = if name == "order" {
                layout.order_amqp_url.to_owned()
            } else {
                amqp_url()
            };
            let database = match layout.postgres {
                Some(url_of) if name != "gateway" => url_of(name),
                _ => format!("sqlite://{}", workdir.join(format!("{name}.db")).display()),
            };
            for (replica, port) in ports[i].iter().enumerate() {
                let instance = if replicas == 1 {
                    name.to_owned()
                } else {
                    format!("{name}-{}", replica + 1)
                };
                let log = workdir.join(format!("{instance}.log"));
                let mut env: Vec<(String, String)> = match layout.otlp {
                    Some((endpoint, delay_ms)) => vec![
                        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.into()),
                        ("OTEL_BSP_SCHEDULE_DELAY".into(), delay_ms.to_string()),
                    ],
                    None => Vec::new(),
                };
                for (key, value) in [
                    ("HOST", "127.0.0.1".to_owned()),
                    ("PORT", port.to_string()),
                    ("AMQP_URL", amqp.clone()),
                    ("EVENTS_NAMESPACE", namespace.clone()),
                    ("DATABASE_URL", database.clone()),
                    ("PRICING_URL", urls(0)),
                    ("INVENTORY_URL", urls(1)),
                    ("ORDER_URL", urls(2)),
                    ("LOG_FORMAT", "json".to_owned()),
                    ("RUST_LOG", "info".to_owned()),
                ] {
                    env.push((key.to_owned(), value));
                }
                for (service, key, value) in layout.extra {
                    if *service == name {
                        env.push(((*key).to_owned(), (*value).to_owned()));
                    }
                }
                let child = spawn(&path, &workdir, &env, &log, false);
                services.push(Service {
                    name: instance,
                    port: *port,
                    log,
                    child,
                    binary: path.clone(),
                    env,
                });
            }
        }
        let stack = Self {
            services,
            namespace,
            workdir,
        };
        for service in &stack.services {
            stack.wait_ready(service).await;
        }
        stack
    }

    pub fn service(&self, name: &str) -> &Service {
        self.services
            .iter()
            .find(|s| s.name == name)
            .expect("a known service")
    }

    /// Kills `name` with `SIGKILL` (no drain, no flush: a crash) and waits until it is gone.
    pub fn kill(&mut self, name: &str) {
        let service = self.service_mut(name);
        service.child.kill().expect("sends SIGKILL");
        service.child.wait().expect("reaps the killed process");
    }

    /// Starts `name` again with its port, database file and environment (its log is appended
    /// to), and waits until it is ready.
    pub async fn restart(&mut self, name: &str) {
        let workdir = self.workdir.clone();
        let service = self.service_mut(name);
        service.child = spawn(&service.binary, &workdir, &service.env, &service.log, true);
        let service = self.service(name);
        self.wait_ready(service).await;
    }

    fn service_mut(&mut self, name: &str) -> &mut Service {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .expect("a known service")
    }

    async fn wait_ready(&self, service: &Service) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let ready = client
                .get(service.url("/readyz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {READY_WITHIN:?}; log:\n{}",
                service.name,
                tail(&service.log)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends SIGTERM to every service (the gateway first) and waits until all have exited, each
    /// with status 0.
    pub async fn terminate(&mut self) {
        for service in self.services.iter().rev() {
            let status = Command::new("kill")
                .args(["-TERM", &service.child.id().to_string()])
                .status()
                .expect("runs kill");
            assert!(status.success(), "cannot signal {}", service.name);
        }
        for service in &mut self.services {
            let deadline = Instant::now() + EXIT_WITHIN;
            loop {
                if let Some(status) = service.child.try_wait().expect("waits") {
                    assert!(
                        status.success(),
                        "{} exited with {status}; log:\n{}",
                        service.name,
                        tail(&service.log)
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} still running {EXIT_WITHIN:?} after SIGTERM",
                    service.name
                );
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// Deletes the namespace's exchanges and queues and the work directory.
    pub async fn cleanup(self) {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connects to the broker");
        let channel = connection.create_channel().await.expect("channel");
        for queue in QUEUES {
            for suffix in ["", ".dlq", ".retry"] {
                let name = format!("{}.{queue}{suffix}", self.namespace);
                let _ = channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for exchange in ["shop.events", "shop.events.dlx"] {
            let name = format!("{}.{exchange}", self.namespace);
            let _ = channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "OK".into()).await;
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A failed test must not leave processes behind.
        for service in &mut self.services {
            if matches!(service.child.try_wait(), Ok(None)) {
                let _ = service.child.kill();
                let _ = service.child.wait();
            }
        }
    }
}

/// The last lines of a log, for failure messages.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Starts `binary` in `workdir` with exactly `env` on top of the test's own environment (minus
/// the OpenTelemetry variables a developer's shell may carry), its output going to `log`.
fn spawn(
    binary: &Path,
    workdir: &Path,
    env: &[(String, String)],
    log: &Path,
    append: bool,
) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(log)
        .expect("opens the log file");
    let mut command = Command::new(binary);
    command
        .current_dir(workdir)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME");
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(out.try_clone().expect("log handle"))
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()))
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    listener.local_addr().expect("addr").port()
}

/// A TCP proxy to the broker that can be cut (every connection closed, new ones refused) and
/// restored, so one service sees the broker go away while the others keep it.
pub struct BrokerProxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
}

impl BrokerProxy {
    pub async fn start() -> Self {
        let upstream = {
            let url = url::Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
            format!(
                "{}:{}",
                url.host_str().unwrap_or("127.0.0.1"),
                url.port().unwrap_or(5672)
            )
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let port = listener.local_addr().expect("addr").port();
        let open = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0_u64);
        let accepting = open.clone();
        let cuts = generation.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            open,
            generation,
        }
    }

    /// The broker URL through this proxy.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        let _ = url.set_host(Some("127.0.0.1"));
        let _ = url.set_port(Some(self.port));
        url.to_string()
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}
