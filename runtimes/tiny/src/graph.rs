//! A decoded, checked graph: initializers, nodes with their inputs resolved to value slots, and a
//! run that evaluates the nodes in order.

use std::collections::HashMap;

use densemesh_runtime_core::TensorSpec;
use prost::Message;

use crate::error::{TinyError, invalid, unsupported};
use crate::heap::{HeapSize, chunk};
use crate::onnx::{self, Attributes, proto::ModelProto};
use crate::ops::{ML_OPSETS, Op, STANDARD_OPSETS};
use crate::value::{Elem, Value};

/// A value slot: initializers first, then graph inputs, then node outputs.
type Slot = u32;

struct Node {
    op: Op,
    inputs: Box<[Option<Slot>]>,
    outputs: Box<[Slot]>,
}

impl HeapSize for Node {
    fn heap_bytes(&self) -> u64 {
        self.op.heap_bytes() + self.inputs.heap_bytes() + self.outputs.heap_bytes()
    }
}

/// A graph input or output as declared, with its slot.
pub(crate) struct Port {
    pub(crate) spec: TensorSpec,
    elem: Elem,
    slot: Slot,
}

impl HeapSize for Port {
    fn heap_bytes(&self) -> u64 {
        self.spec.name.heap_bytes() + chunk(self.spec.shape.capacity() * 8)
    }
}

/// A model ready to run.
pub(crate) struct Graph {
    initializers: Box<[Value]>,
    nodes: Box<[Node]>,
    pub(crate) inputs: Box<[Port]>,
    pub(crate) outputs: Box<[Port]>,
    /// Slots past the initializers.
    computed: usize,
}

impl HeapSize for Graph {
    fn heap_bytes(&self) -> u64 {
        self.initializers.heap_bytes()
            + self.nodes.heap_bytes()
            + self.inputs.heap_bytes()
            + self.outputs.heap_bytes()
    }
}

impl Graph {
    /// Decodes and checks a `ModelProto`; everything about the model is read here, once.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Graph, TinyError> {
        let model = ModelProto::decode(bytes)?;
        if model.ir_version() < 3 {
            return Err(unsupported(format!("onnx IR version {}", model.ir_version())));
        }
        let mut opsets: HashMap<String, i64> = HashMap::new();
        for import in &model.opset_import {
            let domain = match import.domain() {
                "ai.onnx" => "",
                d => d,
            };
            let version = import.version();
            match opsets.insert(domain.to_owned(), version) {
                Some(other) if other != version => {
                    return Err(invalid(format!(
                        "domain {domain:?} imported at opsets {other} and {version}"
                    )));
                }
                _ => {}
            }
        }
        let graph = model.graph.ok_or_else(|| invalid("the model has no graph"))?;

        let mut slots: HashMap<String, Slot> = HashMap::new();
        let mut types: Vec<Elem> = Vec::new();
        let mut initializers = Vec::with_capacity(graph.initializer.len());
        for t in &graph.initializer {
            let value = onnx::tensor_value(t)?;
            slots.insert(t.name().to_owned(), types.len() as Slot);
            types.push(value.elem());
            initializers.push(value);
        }
        // `Constant` nodes become initializers too; their slots must precede every computed one.
        for node in
            graph.node.iter().filter(|n| n.op_type() == "Constant" && matches!(n.domain(), "" | "ai.onnx"))
        {
            let tensor = Attributes::of(node)
                .tensor("value")
                .ok_or_else(|| unsupported("a Constant other than a tensor `value`"))?;
            let value = onnx::tensor_value(tensor)?;
            for out in &node.output {
                slots.insert(out.clone(), types.len() as Slot);
                types.push(value.elem());
                initializers.push(value.clone());
            }
        }
        let port = |info: &onnx::ValueInfoProto, slot: Slot| -> Result<Port, TinyError> {
            let (elem, shape) = onnx::declared(info)?;
            Ok(Port {
                spec: TensorSpec { name: info.name().to_owned(), datatype: elem.datatype(), shape },
                elem,
                slot,
            })
        };
        let mut inputs = Vec::new();
        for info in &graph.input {
            if slots.contains_key(info.name()) {
                // Before IR 4 initializers are listed as inputs too; they stay initializers.
                continue;
            }
            let input = port(info, types.len() as Slot)?;
            slots.insert(info.name().to_owned(), input.slot);
            types.push(input.elem);
            inputs.push(input);
        }

        let mut nodes = Vec::with_capacity(graph.node.len());
        for node in
            graph.node.iter().filter(|n| !(n.op_type() == "Constant" && matches!(n.domain(), "" | "ai.onnx")))
        {
            let domain = if node.domain() == "ai.onnx" { "" } else { node.domain() };
            let opset = *opsets.get(domain).ok_or_else(|| {
                invalid(format!(
                    "operator {} uses domain {domain:?}, which the model does not import",
                    node.op_type()
                ))
            })?;
            let supported = match domain {
                "" => STANDARD_OPSETS.contains(&opset),
                "ai.onnx.ml" => ML_OPSETS.contains(&opset),
                _ => false,
            };
            if !supported {
                return Err(unsupported(format!(
                    "operator {} of domain {domain:?} at opset {opset}",
                    node.op_type()
                )));
            }
            let op = Op::parse(node, opset)?;
            let input_slots = node
                .input
                .iter()
                .map(|name| match name.as_str() {
                    "" => Ok(None),
                    name => slots.get(name).copied().map(Some).ok_or_else(|| {
                        invalid(format!(
                            "{} node {:?} reads {name}, which nothing produces before it",
                            node.op_type(),
                            node.name()
                        ))
                    }),
                })
                .collect::<Result<Box<[_]>, _>>()?;
            let input_types: Vec<Option<Elem>> =
                input_slots.iter().map(|s| s.map(|s| types[s as usize])).collect();
            let produced = op.output_types(node.op_type(), &input_types)?;
            if node.output.len() > produced.len() {
                return Err(invalid(format!(
                    "{} node {:?} lists {} outputs",
                    node.op_type(),
                    node.name(),
                    node.output.len()
                )));
            }
            let mut outputs = Vec::with_capacity(node.output.len());
            for (name, elem) in node.output.iter().zip(produced) {
                let slot = types.len() as Slot;
                types.push(elem);
                if !name.is_empty() {
                    slots.insert(name.clone(), slot);
                }
                outputs.push(slot);
            }
            nodes.push(Node { op, inputs: input_slots, outputs: outputs.into_boxed_slice() });
        }

        let mut outputs = Vec::with_capacity(graph.output.len());
        for info in &graph.output {
            let slot = *slots
                .get(info.name())
                .ok_or_else(|| invalid(format!("no node produces output {}", info.name())))?;
            let output = port(info, slot)?;
            if output.elem != types[slot as usize] {
                return Err(unsupported(format!(
                    "output {} is declared {:?} but computes as {:?}",
                    info.name(),
                    output.elem,
                    types[slot as usize]
                )));
            }
            outputs.push(output);
        }
        let computed = types.len() - initializers.len();
        Ok(Graph {
            initializers: initializers.into_boxed_slice(),
            nodes: nodes.into_boxed_slice(),
            inputs: inputs.into_boxed_slice(),
            outputs: outputs.into_boxed_slice(),
            computed,
        })
    }

    /// Evaluates the graph on `inputs` (one per graph input, in [`Graph::inputs`] order), returning
    /// the outputs at `wanted` (indices into [`Graph::outputs`]).
    pub(crate) fn run(&self, inputs: Vec<Value>, wanted: &[usize]) -> Result<Vec<Value>, TinyError> {
        let base = self.initializers.len();
        let mut values: Vec<Option<Value>> = vec![None; self.computed];
        for (port, value) in self.inputs.iter().zip(inputs) {
            values[port.slot as usize - base] = Some(value);
        }
        fn get<'a>(initializers: &'a [Value], values: &'a [Option<Value>], slot: Slot) -> Option<&'a Value> {
            let slot = slot as usize;
            match slot.checked_sub(initializers.len()) {
                None => initializers.get(slot),
                Some(computed) => values.get(computed).and_then(Option::as_ref),
            }
        }
        for node in self.nodes.iter() {
            let results = {
                let args: Vec<Option<&Value>> =
                    node.inputs.iter().map(|s| s.and_then(|s| get(&self.initializers, &values, s))).collect();
                node.op.run(&args)?
            };
            for (slot, value) in node.outputs.iter().zip(results) {
                values[*slot as usize - base] = Some(value);
            }
        }
        let mut taken = Vec::with_capacity(wanted.len());
        for (n, i) in wanted.iter().enumerate() {
            let port = &self.outputs[*i];
            let slot = port.slot as usize;
            // A computed output asked for once moves out; an initializer, an input passed through
            // or an output asked for twice is copied.
            let once = wanted[n + 1..].iter().all(|j| self.outputs[*j].slot != port.slot);
            let value = match slot.checked_sub(base) {
                Some(computed) if once => values.get_mut(computed).and_then(Option::take),
                _ => get(&self.initializers, &values, port.slot).cloned(),
            };
            taken.push(
                value.ok_or_else(|| {
                    crate::error::eval(format!("output {} was not computed", port.spec.name))
                })?,
            );
        }
        Ok(taken)
    }
}
