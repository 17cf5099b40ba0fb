//! CPU per cluster RPC: tonic's `Channel` against the cluster client's own
//! HTTP/2 service (`src/cluster/channel.rs`), in one process and one run.
//!
//!     cargo bench --bench rpc_transport
//!
//! A tonic server with a trivial `Cluster` service (no Raft, no storage)
//! listens on 127.0.0.1; the same process calls it over each transport in
//! turn, rounds interleaved: `ReadIndex` (empty request, 64-byte answer) one
//! call at a time, and `Forward` (300-byte request) from 16 tasks at once.
//! Both ends run in the process, so its CPU time (utime + stime, from
//! /proc/self/stat) per call is the transport's cost at both ends, as on a
//! node. Prints the median of each over the rounds and the ratio new/old.
//!
//! `cargo test --all-targets` builds this and runs it without `--bench`,
//! which only prints how to run it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tempalias::cluster::channel::{PeerChannel, Target};
use tempalias::cluster::proto::cluster_client::ClusterClient;
use tempalias::cluster::proto::cluster_server::{Cluster, ClusterServer};
use tempalias::cluster::proto::{Empty, Payload};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

struct Trivial;

fn answer() -> Result<Response<Payload>, Status> {
    Ok(Response::new(Payload {
        json: vec![b'x'; 64],
    }))
}

#[tonic::async_trait]
impl Cluster for Trivial {
    async fn append_entries(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        answer()
    }
    async fn vote(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        answer()
    }
    async fn install_snapshot(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        answer()
    }
    async fn forward(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        answer()
    }
    async fn read_index(&self, _: Request<Empty>) -> Result<Response<Payload>, Status> {
        answer()
    }
    async fn status(&self, _: Request<Empty>) -> Result<Response<Payload>, Status> {
        answer()
    }
    async fn change_membership(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        answer()
    }
    async fn trigger_election(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }
    async fn maintenance(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        answer()
    }
}

/// The bearer header, as the cluster client adds it.
fn auth(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.metadata_mut()
        .insert("authorization", "Bearer bench-secret".parse().unwrap());
    Ok(req)
}

type AuthFn = fn(Request<()>) -> Result<Request<()>, Status>;

#[derive(Clone)]
enum Client {
    Channel(ClusterClient<InterceptedService<tonic::transport::Channel, AuthFn>>),
    Direct(ClusterClient<InterceptedService<PeerChannel, AuthFn>>),
}

impl Client {
    /// tonic's `Channel` with the settings the cluster client used.
    fn channel(addr: SocketAddr) -> Self {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Client::Channel(ClusterClient::with_interceptor(channel, auth as AuthFn))
    }

    fn direct(addr: SocketAddr) -> Self {
        let channel = PeerChannel::new(Target {
            addr: addr.to_string(),
            local: None,
            connect_timeout: Duration::from_secs(1),
        });
        let origin = format!("http://{addr}").parse().unwrap();
        Client::Direct(ClusterClient::with_origin(
            InterceptedService::new(channel, auth as AuthFn),
            origin,
        ))
    }

    async fn read_index(&mut self) {
        let mut req = Request::new(Empty {});
        req.set_timeout(Duration::from_secs(5));
        match self {
            Client::Channel(c) => c.read_index(req).await.unwrap(),
            Client::Direct(c) => c.read_index(req).await.unwrap(),
        };
    }

    async fn forward(&mut self) {
        let mut req = Request::new(Payload {
            json: vec![b'y'; 300],
        });
        req.set_timeout(Duration::from_secs(5));
        match self {
            Client::Channel(c) => c.forward(req).await.unwrap(),
            Client::Direct(c) => c.forward(req).await.unwrap(),
        };
    }
}

/// This process's CPU time so far (user + system), from /proc/self/stat.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock
    // ticks of 1/100 s (USER_HZ on Linux).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// (CPU µs per call, calls per second).
async fn sequential(client: &Client, calls: usize) -> (f64, f64) {
    let mut c = client.clone();
    let (cpu0, t0) = (cpu(), Instant::now());
    for _ in 0..calls {
        c.read_index().await;
    }
    let (cpu1, wall) = (cpu(), t0.elapsed());
    (
        (cpu1 - cpu0).as_secs_f64() * 1e6 / calls as f64,
        calls as f64 / wall.as_secs_f64(),
    )
}

async fn concurrent(client: &Client, tasks: usize, calls: usize) -> (f64, f64) {
    let (cpu0, t0) = (cpu(), Instant::now());
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                for _ in 0..calls {
                    c.forward().await;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let (cpu1, wall) = (cpu(), t0.elapsed());
    let n = (tasks * calls) as f64;
    (
        (cpu1 - cpu0).as_secs_f64() * 1e6 / n,
        n / wall.as_secs_f64(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("rpc_transport: run with `cargo bench --bench rpc_transport`");
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // Two workers, as a node has on this kind of machine.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(ClusterServer::new(Trivial))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let clients = [
            ("tonic Channel", Client::channel(addr)),
            ("h2 direct", Client::direct(addr)),
        ];
        // Warm-up: connections made, allocator and caches settled.
        for (_, c) in &clients {
            sequential(c, 2000).await;
            concurrent(c, 16, 200).await;
        }
        let mut seq: [Vec<(f64, f64)>; 2] = Default::default();
        let mut conc: [Vec<(f64, f64)>; 2] = Default::default();
        for round in 0..rounds {
            // Alternate which goes first, so that drift hits both alike.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                seq[i].push(sequential(&clients[i].1, 20_000).await);
                conc[i].push(concurrent(&clients[i].1, 16, 2_500).await);
            }
        }
        println!("rpc_transport: {rounds} interleaved rounds, medians; CPU of both ends per call");
        println!("| transport | ReadIndex 1 at a time: CPU µs/call | calls/s | Forward 16 at once: CPU µs/call | calls/s |");
        println!("|---|---|---|---|---|");
        let mut figures = Vec::new();
        for (i, (name, _)) in clients.iter().enumerate() {
            let f = [
                median(seq[i].iter().map(|x| x.0).collect()),
                median(seq[i].iter().map(|x| x.1).collect()),
                median(conc[i].iter().map(|x| x.0).collect()),
                median(conc[i].iter().map(|x| x.1).collect()),
            ];
            println!(
                "| {name} | {:.1} | {:.0} | {:.1} | {:.0} |",
                f[0], f[1], f[2], f[3]
            );
            figures.push(f);
        }
        println!(
            "| ratio direct/Channel | {:.2} | {:.2} | {:.2} | {:.2} |",
            figures[1][0] / figures[0][0],
            figures[1][1] / figures[0][1],
            figures[1][2] / figures[0][2],
            figures[1][3] / figures[0][3],
        );
        for (i, (name, _)) in clients.iter().enumerate() {
            println!(
                "per round, {name}: ReadIndex µs {:?}; Forward µs {:?}",
                seq[i].iter().map(|x| x.0.round()).collect::<Vec<_>>(),
                conc[i].iter().map(|x| x.0.round()).collect::<Vec<_>>()
            );
        }
    });
}
