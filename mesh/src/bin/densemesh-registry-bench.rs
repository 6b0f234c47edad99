//! Registrations per second through the ModelMesh management API, then unregistrations: the
//! registry's write path (store, view, answer) as a client sees it.
//!
//! `densemesh-registry-bench --addr 127.0.0.1:8033 --count 10000 --concurrency 8`

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use densemesh_proto::mmesh::model_mesh_client::ModelMeshClient;
use densemesh_proto::mmesh::{ModelInfo, RegisterModelRequest, UnregisterModelRequest};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "densemesh-registry-bench")]
struct Args {
    #[arg(long)]
    addr: String,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Path the registered models point at; they are never loaded.
    #[arg(long, default_value = "/nonexistent/model.onnx")]
    path: String,
}

async fn timed(
    channel: &Channel,
    ids: &Arc<Vec<String>>,
    args: &Args,
    unregister: bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let workers = args.concurrency.max(1);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (ids, path) = (ids.clone(), args.path.clone());
            let mut client = ModelMeshClient::new(channel.clone());
            tokio::spawn(async move {
                for id in ids.iter().skip(w).step_by(workers) {
                    if unregister {
                        client.unregister_model(UnregisterModelRequest { model_id: id.clone() }).await?;
                    } else {
                        let info =
                            ModelInfo { r#type: "onnx".into(), path: path.clone(), ..Default::default() };
                        let request = RegisterModelRequest {
                            model_id: id.clone(),
                            model_info: Some(info),
                            ..Default::default()
                        };
                        client.register_model(request).await?;
                    }
                }
                Ok::<_, tonic::Status>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))?.connect().await?;
    let ids: Arc<Vec<String>> = Arc::new((0..args.count).map(|i| format!("bench-model-{i:06}")).collect());
    let registering = timed(&channel, &ids, &args, false).await?;
    let unregistering = timed(&channel, &ids, &args, true).await?;
    let per_s = |d: Duration| args.count as f64 / d.as_secs_f64();
    println!(
        "register {} models with {} clients: {:.2} s ({:.0}/s); unregister: {:.2} s ({:.0}/s)",
        args.count,
        args.concurrency,
        registering.as_secs_f64(),
        per_s(registering),
        unregistering.as_secs_f64(),
        per_s(unregistering)
    );
    let json = serde_json::json!({ "kind": "register", "count": args.count, "concurrency": args.concurrency,
        "register_per_s": per_s(registering), "unregister_per_s": per_s(unregistering) });
    println!("JSON {json}");
    Ok(())
}
