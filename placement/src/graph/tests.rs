use serde_json::json;

use super::*;

fn known() -> HashMap<String, Known> {
    [("scale", Known::Model), ("classify", Known::Model), ("argmax", Known::Model), ("isvc", Known::VModel)]
        .into_iter()
        .map(|(n, k)| (n.to_owned(), k))
        .collect()
}

fn graph(value: serde_json::Value) -> GraphSpec {
    serde_json::from_value(value).unwrap()
}

fn check(value: serde_json::Value) -> Result<(), GraphError> {
    validate(&ModelId::new("g").unwrap(), &graph(value), &known())
}

#[test]
fn reads_kserve_inference_graph_specs_and_ignores_fields_it_does_not_know() {
    // KServe's own example, with fields this mesh has no use for (resources, a newer release's).
    let spec = graph(json!({
        "nodes": {
            "root": {"routerType": "Sequence", "steps": [
                {"serviceName": "scale", "name": "scale"},
                {"serviceName": "classify", "name": "classify", "data": "$response", "dependency": "Hard",
                 "inputMap": {"input": "scaled"}, "futureField": 1},
                {"nodeName": "pick", "name": "pick", "data": "$response"}
            ]},
            "pick": {"routerType": "Switch", "steps": [
                {"serviceName": "argmax", "condition": "[@this].#(parameters.mode==\"max\")"},
                {"serviceName": "isvc"}
            ]}
        },
        "resources": {"limits": {"cpu": "1"}},
        "minReplicas": 1
    }));
    let root = &spec.nodes["root"];
    assert_eq!(root.router_type, RouterType::Sequence);
    assert_eq!(root.steps[1].dependency, Dependency::Hard);
    assert_eq!(root.steps[0].dependency, Dependency::Soft, "KServe's default");
    assert_eq!((root.steps[0].data(), root.steps[1].data()), (Data::Request, Data::Response));
    assert_eq!(root.steps[1].input_map["input"], "scaled");
    assert_eq!(spec.nodes["pick"].steps[1].label(), "isvc", "named by its target");
    assert_eq!(validate(&ModelId::new("g").unwrap(), &spec, &known()), Ok(()));
    assert_eq!(service_names(&spec), ["argmax", "classify", "isvc", "scale"]);
    // What is stored reads back the same.
    let stored = serde_json::to_vec(&spec).unwrap();
    assert_eq!(serde_json::from_slice::<GraphSpec>(&stored).unwrap(), spec);
}

#[test]
fn refuses_graphs_that_cannot_run() {
    let sequence =
        |steps: serde_json::Value| json!({"nodes": {"root": {"routerType": "Sequence", "steps": steps}}});
    let cases = [
        (
            json!({"nodes": {"other": {"routerType": "Sequence", "steps": [{"serviceName": "scale"}]}}}),
            "no root",
        ),
        (sequence(json!([])), "node root has no steps"),
        (
            sequence(json!([{"serviceName": "ghost"}])),
            "serviceName ghost is not a registered model or vmodel",
        ),
        (sequence(json!([{"nodeName": "nowhere"}])), "nodeName nowhere is not a node"),
        (sequence(json!([{"name": "both", "serviceName": "scale", "nodeName": "root"}])), "exactly one"),
        (sequence(json!([{"name": "url", "serviceUrl": "http://x"}])), "serviceUrl is not supported"),
        (sequence(json!([{"serviceName": "scale"}, {"serviceName": "scale"}])), "two steps are named scale"),
        (sequence(json!([{"serviceName": "scale", "data": "$previous"}])), "data \"$previous\""),
        (sequence(json!([{"serviceName": "scale", "weight": 50}])), "only read on Splitter"),
        (sequence(json!([{"serviceName": "scale", "condition": "parameters.a"}])), "only read on Switch"),
        (
            json!({"nodes": {"root": {"routerType": "Switch", "steps": [
                {"serviceName": "scale", "condition": "instances.#(intent==\"Open\")"}]}}}),
            "condition \"instances.#(intent==\\\"Open\\\")\" is not supported",
        ),
        (
            json!({"nodes": {"root": {"routerType": "Splitter", "steps": [
                {"serviceName": "scale", "weight": 60}, {"serviceName": "classify", "weight": 30}]}}}),
            "weights sum to 90",
        ),
        (
            json!({"nodes": {"root": {"routerType": "Splitter", "steps": [
                {"serviceName": "scale", "weight": 100}, {"serviceName": "classify"}]}}}),
            "needs a weight",
        ),
        (
            json!({"nodes": {
                "root": {"routerType": "Sequence", "steps": [{"nodeName": "a"}]},
                "a": {"routerType": "Ensemble", "steps": [{"serviceName": "scale"}, {"nodeName": "b"}]},
                "b": {"routerType": "Sequence", "steps": [{"nodeName": "a"}]}
            }}),
            "cycle: a -> b -> a",
        ),
        (sequence(json!([{"nodeName": "root"}])), "cycle: root -> root"),
    ];
    for (spec, says) in cases {
        let err = check(spec.clone()).expect_err(says).to_string();
        assert!(err.contains(says), "{spec}: {err} does not say {says:?}");
        assert!(err.starts_with("graph g"), "{err}");
    }
}

#[test]
fn a_graph_may_not_take_a_model_or_vmodel_name() {
    let spec =
        graph(json!({"nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceName": "scale"}]}}}));
    for (name, kind) in [("scale", "model"), ("isvc", "vmodel")] {
        let err = validate(&ModelId::new(name).unwrap(), &spec, &known()).unwrap_err();
        assert_eq!(err, GraphError::NameTaken { graph: name.to_owned(), kind });
    }
}

#[test]
fn unknown_router_types_and_dependencies_do_not_read() {
    let bad_router = json!({"nodes": {"root": {"routerType": "Parallel", "steps": []}}});
    assert!(serde_json::from_value::<GraphSpec>(bad_router).is_err());
    let bad_dependency = json!({"nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceName": "a", "dependency": "Firm"}]}}});
    assert!(serde_json::from_value::<GraphSpec>(bad_dependency).is_err());
}
