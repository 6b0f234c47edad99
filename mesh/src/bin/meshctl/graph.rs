//! `meshctl graph set|get|delete|list`, and the InferenceGraph documents `meshctl apply -f` registers:
//! KServe's `serving.kserve.io/v1alpha1` InferenceGraph, its `spec` sent as it is written (the mesh
//! checks it and refuses what it cannot run, with the reason).

use std::path::Path;

use clap::Subcommand;
use densemesh_controller::mesh::Authorized;
use densemesh_proto::admin::admin_client::AdminClient;
use densemesh_proto::admin::{
    DeleteGraphRequest, GetGraphRequest, GraphInfo, ListGraphsRequest, SetGraphRequest,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Failure, Output, print};

/// The kind and API group `apply` takes graphs in.
const KIND: &str = "InferenceGraph";
const GROUP: &str = "serving.kserve.io";

#[derive(Subcommand)]
pub enum GraphCommand {
    /// Register or replace an inference graph from a file: an InferenceGraph manifest (YAML or JSON)
    /// or just its spec (`{"nodes": {"root": ...}}`). NAME defaults to the manifest's metadata.name.
    Set {
        #[arg(long, short = 'f')]
        file: std::path::PathBuf,
        name: Option<String>,
    },
    /// A graph's spec, as stored.
    Get { name: String },
    /// Delete a graph (a no-op for unknown names).
    Delete { name: String },
    /// Every graph.
    List,
}

/// An InferenceGraph found in a manifest: its name and spec.
#[derive(Debug)]
pub struct GraphManifest {
    pub name: String,
    pub spec: Value,
}

/// The InferenceGraphs among a file's YAML documents (other kinds are left to the rest of `apply`).
pub fn manifests(text: &str, source: &str) -> Result<Vec<GraphManifest>, String> {
    let mut out = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = |e: &dyn std::fmt::Display| format!("{source}: document {}: {e}", i + 1);
        let value = Value::deserialize(document).map_err(|e| at(&e))?;
        if value.get("kind").and_then(Value::as_str) != Some(KIND) {
            continue;
        }
        let group = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().split('/').next();
        if group != Some(GROUP) {
            continue;
        }
        let name = value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty() {
            return Err(at(&"InferenceGraph has no metadata.name"));
        }
        let spec =
            value.get("spec").cloned().ok_or_else(|| at(&format!("InferenceGraph {name} has no spec")))?;
        out.push(GraphManifest { name: name.to_owned(), spec });
    }
    Ok(out)
}

/// Registers one graph.
pub async fn set(
    admin: &mut AdminClient<Authorized>,
    name: &str,
    spec: &Value,
) -> Result<GraphInfo, Failure> {
    let request = SetGraphRequest { name: name.to_owned(), spec_json: spec.to_string() };
    Ok(admin.set_graph(request).await?.into_inner())
}

fn graph_json(info: &GraphInfo) -> Value {
    let spec: Value = serde_json::from_str(&info.spec_json).unwrap_or(Value::Null);
    json!({ "name": info.name, "spec": spec })
}

/// A one-line summary: each node's router type and steps.
fn describe(info: &GraphInfo) -> String {
    let spec: Value = serde_json::from_str(&info.spec_json).unwrap_or(Value::Null);
    let nodes = spec.get("nodes").and_then(Value::as_object).into_iter().flatten().map(|(node, n)| {
        let steps: Vec<String> = n
            .get("steps")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|s| {
                let target = s.get("serviceName").or_else(|| s.get("nodeName")).and_then(Value::as_str);
                let name = s.get("name").and_then(Value::as_str).or(target).unwrap_or_default();
                match target {
                    Some(target) if target != name => format!("{name}={target}"),
                    _ => name.to_owned(),
                }
            })
            .collect();
        let router = n.get("routerType").and_then(Value::as_str).unwrap_or_default();
        format!("{node}:{router}[{}]", steps.join(","))
    });
    format!("{}\t{}", info.name, nodes.collect::<Vec<_>>().join(" "))
}

pub async fn run(
    out: Output,
    admin: &mut AdminClient<Authorized>,
    command: &GraphCommand,
) -> Result<(), Failure> {
    match command {
        GraphCommand::Set { file, name } => {
            let (name, spec) = read_graph(file, name.as_deref())?;
            let info = set(admin, &name, &spec).await?;
            print(out, &graph_json(&info), || format!("{}\tset", info.name));
        }
        GraphCommand::Get { name } => {
            let info = admin.get_graph(GetGraphRequest { name: name.clone() }).await?.into_inner();
            print(out, &graph_json(&info), || describe(&info));
        }
        GraphCommand::Delete { name } => {
            let deleted =
                admin.delete_graph(DeleteGraphRequest { name: name.clone() }).await?.into_inner().deleted;
            print(out, &json!({ "name": name, "deleted": deleted }), || {
                format!("{name}\t{}", if deleted { "deleted" } else { "not found" })
            });
        }
        GraphCommand::List => {
            let graphs = admin.list_graphs(ListGraphsRequest {}).await?.into_inner().graphs;
            let value = Value::from(graphs.iter().map(graph_json).collect::<Vec<_>>());
            print(out, &value, || {
                let mut table = String::from("GRAPH\tNODES");
                for info in &graphs {
                    table.push('\n');
                    table.push_str(&describe(info));
                }
                table
            });
        }
    }
    Ok(())
}

/// The graph in `file`: an InferenceGraph manifest or a bare spec, named by `name` or the manifest.
fn read_graph(file: &Path, name: Option<&str>) -> Result<(String, Value), Failure> {
    let usage = |message: String| Failure { code: 2, message };
    let text = std::fs::read_to_string(file).map_err(|e| usage(format!("-f {}: {e}", file.display())))?;
    let source = file.display().to_string();
    let found = manifests(&text, &source).map_err(usage)?;
    match (found.as_slice(), name) {
        ([one], None) => Ok((one.name.clone(), one.spec.clone())),
        ([one], Some(name)) => Ok((name.to_owned(), one.spec.clone())),
        ([], Some(name)) => {
            let spec: Value =
                serde_yaml::from_str(&text).map_err(|e| usage(format!("{source}: not YAML: {e}")))?;
            Ok((name.to_owned(), spec))
        }
        ([], None) => {
            Err(usage(format!("{source} holds no InferenceGraph; name the graph to read it as a bare spec")))
        }
        (_, _) => Err(usage(format!("{source} holds {} InferenceGraphs; use meshctl apply -f", found.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_inference_graphs_among_other_documents() {
        let text = r#"
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata: {name: isvc}
---
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata:
  name: chain
spec:
  nodes:
    root:
      routerType: Sequence
      steps:
      - serviceName: isvc
        data: $request
---
apiVersion: other.io/v1
kind: InferenceGraph
metadata: {name: not-ours}
spec: {}
"#;
        let found = manifests(text, "f.yaml").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "chain");
        assert_eq!(found[0].spec["nodes"]["root"]["steps"][0]["serviceName"], "isvc");
        let unnamed = "apiVersion: serving.kserve.io/v1alpha1\nkind: InferenceGraph\nspec: {}\n";
        assert!(manifests(unnamed, "g.yaml").unwrap_err().contains("no metadata.name"));
    }
}
