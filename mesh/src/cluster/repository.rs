//! The model repository directory as a registration source: its models are registered at start
//! (source `repository`) and kept in step as files appear, change or vanish. A model registered
//! through the API is never touched, even when a directory of the same name appears or goes.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use densemesh_placement::registry::{Registry, RegistryError};
use densemesh_placement::{ClusterView, ModelId, ModelSpec, Source};
use densemesh_puller::LocalRepository;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What one pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub registered: Vec<ModelId>,
    pub updated: Vec<ModelId>,
    pub unregistered: Vec<ModelId>,
}

/// Files change in bursts (a copy, an unpack); one pass after they settle.
const SETTLE: Duration = Duration::from_millis(300);

/// One pass: the registry's repository-sourced models made to match the directory.
pub async fn sync_once(
    registry: &Registry,
    view: &ClusterView,
    root: &Path,
) -> Result<SyncReport, RegistryError> {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    let scan_root = root.clone();
    let found = tokio::task::spawn_blocking(move || scan(&scan_root))
        .await
        .map_err(|e| RegistryError::Invalid(format!("repository scan failed: {e}")))?;
    let mut report = SyncReport::default();
    let mut present = HashSet::new();
    for (id, generation) in found {
        present.insert(id.clone());
        let spec = ModelSpec {
            model_type: "onnx".to_owned(),
            path: root.join(id.as_str()).to_string_lossy().into_owned(),
            key: None,
            source: Source::Repository,
            auto_delete: false,
            generation,
        };
        match registry.model(&id).await? {
            None => {
                if registry.replace(&id, &spec, 0).await? {
                    report.registered.push(id);
                }
            }
            Some((existing, revision)) if existing.source == Source::Repository && existing != spec => {
                if registry.replace(&id, &spec, revision).await? {
                    report.updated.push(id);
                }
            }
            Some(_) => {}
        }
    }
    let gone = view
        .models()
        .into_iter()
        .filter(|(id, spec)| spec.source == Source::Repository && !present.contains(id));
    for (id, _) in gone {
        let Some((current, revision)) = registry.model(&id).await? else { continue };
        // Re-checked at its revision: the API may have taken the id over meanwhile.
        if current.source == Source::Repository
            && registry.store().compare_and_delete(&model_key(registry, &id), revision).await?.succeeded
        {
            report.unregistered.push(id);
        }
    }
    if let Ok(range) = registry.store().range(registry.prefix()).await {
        view.caught_up(range.revision).await;
    }
    Ok(report)
}

fn model_key(registry: &Registry, id: &ModelId) -> String {
    format!("{}{id}", registry.models_prefix())
}

/// Models in the directory, each with a generation that changes when its file changes.
fn scan(root: &Path) -> Vec<(ModelId, u64)> {
    let repository = LocalRepository::new(root);
    let Ok(ids) = repository.list() else { return Vec::new() };
    ids.into_iter()
        .filter_map(|id| {
            let local = repository.resolve(&id).ok()?;
            let meta = std::fs::metadata(&local.path).ok()?;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (local.path.as_os_str(), meta.len(), meta.modified().ok()).hash(&mut h);
            Some((id, h.finish()))
        })
        .collect()
}

/// Keeps the registry in step with the directory until `stop`.
pub async fn watch(registry: Registry, view: ClusterView, root: PathBuf, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| w.watch(&root, RecursiveMode::Recursive).map(|()| w));
    let _watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(repository = %root.display(), error = %e, "cannot watch the model repository; changes need a restart");
            return;
        }
    };
    loop {
        tokio::select! {
            event = rx.recv() => if event.is_none() { return },
            _ = stop.cancelled() => return,
        }
        // Let the burst settle, then drain what queued meanwhile.
        tokio::select! {
            _ = tokio::time::sleep(SETTLE) => {}
            _ = stop.cancelled() => return,
        }
        while rx.try_recv().is_ok() {}
        match sync_once(&registry, &view, &root).await {
            Ok(report) if report != SyncReport::default() => {
                tracing::info!(?report, "model repository changed")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot sync the model repository"),
        }
    }
}
