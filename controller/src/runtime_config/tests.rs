//! The runtime file each kind of ServingRuntime renders to, and the specs meshd cannot use.

use super::*;

fn spec(yaml: &str) -> ServingRuntimeSpec {
    serde_yaml::from_str(yaml).expect("a ServingRuntime spec")
}

fn rendered(name: &str, yaml: &str) -> Value {
    let file = render(name, &spec(yaml)).expect("renders").expect("a runtime file");
    assert!(file.starts_with("# Rendered by densemesh-controller"), "{file}");
    serde_yaml::from_str(&file).expect("the file is YAML")
}

/// modelmesh-serving's own MLServer runtime (config/runtimes/mlserver-1.x.yaml), trimmed.
const MLSERVER: &str = r#"
supportedModelFormats:
  - {name: sklearn, version: "0", autoSelect: true}
  - {name: xgboost, version: "1", autoSelect: true}
  - {name: lightgbm, version: "3", autoSelect: true}
protocolVersions: [grpc-v2]
multiModel: true
grpcEndpoint: "port:8085"
grpcDataEndpoint: "port:8001"
containers:
  - name: mlserver
    image: seldonio/mlserver:1.7.1
    env:
      - {name: MLSERVER_MODELS_DIR, value: "/models/_mlserver_models/"}
      - {name: MLSERVER_GRPC_PORT, value: "8001"}
      - {name: MLSERVER_LOAD_MODELS_AT_STARTUP, value: "false"}
builtInAdapter:
  serverType: mlserver
  runtimeManagementPort: 8001
  memBufferBytes: 134217728
  modelLoadingTimeoutMillis: 90000
"#;

#[test]
fn an_mlserver_runtime_is_a_v2_server_meshd_drives_at_its_data_port() {
    let file = rendered("mlserver-1.x", MLSERVER);
    assert_eq!(
        file,
        json!({"runtimes": [{
            "kind": "v2",
            "name": "mlserver-1.x",
            "supportedModelFormats": [
                {"name": "sklearn", "version": "0", "autoSelect": true},
                {"name": "xgboost", "version": "1", "autoSelect": true},
                {"name": "lightgbm", "version": "3", "autoSelect": true},
            ],
            "endpoint": "127.0.0.1:8001",
            "repository": "/models/_mlserver_models",
            "timeouts": {"load": "90000ms"},
        }]})
    );
    // Without the env and the data endpoint: modelmesh-serving's defaults.
    let bare = rendered(
        "m",
        "supportedModelFormats: [{name: sklearn}]\ncontainers: [{name: s, image: mlserver}]\nbuiltInAdapter: {serverType: MLServer}\n",
    );
    assert_eq!(bare["runtimes"][0]["endpoint"], "127.0.0.1:8001");
    assert_eq!(bare["runtimes"][0]["repository"], "/models/_mlserver_models");
    assert!(bare["runtimes"][0].get("timeouts").is_none());
    assert_eq!(repository_outside_shared_dir(&spec(MLSERVER)), None, "/models is shared already");
    let elsewhere = MLSERVER.replace("/models/_mlserver_models/", "/srv/repo");
    assert_eq!(rendered("m", &elsewhere)["runtimes"][0]["repository"], "/srv/repo");
    assert_eq!(repository_outside_shared_dir(&spec(&elsewhere)).as_deref(), Some("/srv/repo"));
    let sibling = MLSERVER.replace("/models/_mlserver_models/", "/models-x/repo");
    assert_eq!(repository_outside_shared_dir(&spec(&sibling)).as_deref(), Some("/models-x/repo"));
}

#[test]
fn a_custom_runtime_speaks_the_spi_at_its_grpc_endpoint() {
    let file = rendered(
        "custom",
        r#"
supportedModelFormats: [{name: custom}]
grpcEndpoint: "port:8085"
grpcDataEndpoint: "port:8090"
containers: [{name: runtime, image: example/runtime:1}]
"#,
    );
    assert_eq!(
        file,
        json!({"runtimes": [{
            "kind": "spi",
            "name": "custom",
            "supportedModelFormats": [{"name": "custom"}],
            "endpoint": "port:8085",
            "dataEndpoint": "port:8090",
        }]})
    );
    let socket = rendered(
        "sock",
        "supportedModelFormats: [{name: c}]\ngrpcEndpoint: unix:///var/run/rt.sock\ncontainers: [{name: r, image: i}]\n",
    );
    assert_eq!(socket["runtimes"][0]["endpoint"], "unix:///var/run/rt.sock");
    assert!(socket["runtimes"][0].get("dataEndpoint").is_none());
}

#[test]
fn meshd_alone_needs_no_runtime_file() {
    // The chart's default runtime: a container named meshd without an image carries resources only.
    let own = "supportedModelFormats: [{name: onnx}]\ncontainers: [{name: meshd, resources: {limits: {memory: 1Gi}}}]\n";
    assert_eq!(render("onnx", &spec(own)).unwrap(), None);
    assert_eq!(render("onnx", &spec("supportedModelFormats: [{name: onnx}]\n")).unwrap(), None);
    // An image-less container of another name (older densemesh specs) is a resource carrier too.
    let carrier = "supportedModelFormats: [{name: onnx}]\ncontainers: [{name: runtime, resources: {}}]\n";
    assert_eq!(render("onnx", &spec(carrier)).unwrap(), None);
}

#[test]
fn what_meshd_cannot_use_is_named() {
    let cases = [
        ("supportedModelFormats: [{name: x}]\ncontainers: [{name: r, image: i}]\n", "no grpcEndpoint"),
        (
            "supportedModelFormats: [{name: x}]\ncontainers: [{name: r, image: i}]\nbuiltInAdapter: {serverType: triton}\n",
            "serverType \"triton\" is not supported",
        ),
        ("supportedModelFormats: []\ngrpcEndpoint: 'port:1'\n", "no supportedModelFormats"),
        ("supportedModelFormats: [{name: x}]\ngrpcEndpoint: 'port:0'\n", "grpcEndpoint \"port:0\""),
        ("supportedModelFormats: [{name: x}]\ngrpcEndpoint: 'port:http'\n", "is not port:<1-65535>"),
        (
            "supportedModelFormats: [{name: x}]\nbuiltInAdapter: {serverType: mlserver}\ngrpcDataEndpoint: unix:///s\n",
            "not a unix socket",
        ),
        (
            "supportedModelFormats: [{name: x}]\nbuiltInAdapter: {serverType: mlserver}\ncontainers: [{name: m, image: i, env: [{name: MLSERVER_MODELS_DIR, value: models}]}]\n",
            "not an absolute path",
        ),
        (
            "supportedModelFormats: [{name: x}]\nbuiltInAdapter: {serverType: mlserver, modelLoadingTimeoutMillis: 0}\n",
            "not positive",
        ),
    ];
    for (yaml, why) in cases {
        let err = render("r", &spec(yaml)).expect_err(yaml);
        assert!(err.contains(why), "{yaml}: {err}");
    }
}

#[test]
fn the_config_map_holds_the_file_and_belongs_to_the_runtime() {
    let owner = OwnerReference { kind: "ServingRuntime".into(), name: "rt".into(), ..Default::default() };
    let map = config_map("densemesh-rt", "ns", "runtimes: []\n", owner);
    assert_eq!(map.metadata.name.as_deref(), Some("densemesh-rt-runtime-config"));
    assert_eq!(map.metadata.namespace.as_deref(), Some("ns"));
    assert_eq!(map.metadata.owner_references.unwrap()[0].name, "rt");
    assert_eq!(map.data.unwrap()[RUNTIME_FILE_KEY], "runtimes: []\n");
}
