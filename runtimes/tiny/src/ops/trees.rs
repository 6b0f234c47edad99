//! `TreeEnsembleRegressor` and `TreeEnsembleClassifier` (ai.onnx.ml 1–3), as ONNX Runtime evaluates
//! them (its `tree_ensemble_aggregator.h`): the same traversal, aggregation and, for two classes,
//! the same choice of label and of how one score becomes two.

use std::collections::HashMap;

use crate::error::{TinyError, eval, invalid, unsupported};
use crate::heap::HeapSize;
use crate::onnx::Attributes;
use crate::ops::ml::{Labels, PostTransform, write_scores};
use crate::value::{Data, Value};

/// How a node compares a feature to its threshold (or that it is a leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

/// One node, its children and leaf weights as indices into the ensemble's flat arrays.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    feature: u32,
    threshold: f32,
    mode: Mode,
    missing_goes_true: bool,
    true_child: u32,
    false_child: u32,
    weights_start: u32,
    weights_len: u32,
}

/// How a regressor combines its trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Regressor { aggregate: Aggregate },
    Classifier { labels: Labels, binary_case: bool, all_positive: bool },
}

/// A parsed ensemble.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeEnsemble {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    /// Leaf weights: (target or class, weight).
    weights: Vec<(u32, f32)>,
    base_values: Vec<f32>,
    post: PostTransform,
    /// Targets (regressor) or classes (classifier).
    outputs: usize,
    /// The smallest number of features an input row must have.
    features: usize,
    kind: Kind,
}

impl HeapSize for TreeEnsemble {
    fn heap_bytes(&self) -> u64 {
        let labels = match &self.kind {
            Kind::Classifier { labels, .. } => labels.heap_bytes(),
            Kind::Regressor { .. } => 0,
        };
        crate::heap::chunk(self.nodes.capacity() * std::mem::size_of::<Node>())
            + self.roots.heap_bytes()
            + crate::heap::chunk(self.weights.capacity() * std::mem::size_of::<(u32, f32)>())
            + self.base_values.heap_bytes()
            + labels
    }
}

/// A per-output running score, and whether any leaf gave it one.
#[derive(Debug, Clone, Copy, Default)]
struct Score {
    value: f32,
    set: bool,
}

impl TreeEnsemble {
    pub(crate) fn parse(attrs: &Attributes<'_>, classifier: bool) -> Result<Self, TinyError> {
        for name in [
            "nodes_values_as_tensor",
            "base_values_as_tensor",
            "target_weights_as_tensor",
            "class_weights_as_tensor",
            "nodes_hitrates_as_tensor",
        ] {
            if attrs.has(name) {
                return Err(unsupported(format!("tree ensemble attribute {name}")));
            }
        }
        let (tree_ids, node_ids) = (attrs.ints("nodes_treeids"), attrs.ints("nodes_nodeids"));
        let features = attrs.ints("nodes_featureids");
        let thresholds = attrs.floats("nodes_values");
        let modes = attrs.strings("nodes_modes");
        let (trues, falses) = (attrs.ints("nodes_truenodeids"), attrs.ints("nodes_falsenodeids"));
        let missing = attrs.ints("nodes_missing_value_tracks_true");
        let n = tree_ids.len();
        if n == 0 {
            return Err(attrs.missing("nodes_treeids"));
        }
        for (name, len) in [
            ("nodes_nodeids", node_ids.len()),
            ("nodes_featureids", features.len()),
            ("nodes_modes", modes.len()),
            ("nodes_truenodeids", trues.len()),
            ("nodes_falsenodeids", falses.len()),
        ] {
            if len != n {
                return Err(invalid(format!("tree ensemble has {n} nodes but {len} {name}")));
            }
        }
        if !(thresholds.len() == n || thresholds.is_empty()) || !(missing.is_empty() || missing.len() == n) {
            return Err(invalid(
                "tree ensemble's nodes_values or nodes_missing_value_tracks_true do not match its nodes",
            ));
        }
        let mut index: HashMap<(i64, i64), u32> = HashMap::with_capacity(n);
        for i in 0..n {
            if index.insert((tree_ids[i], node_ids[i]), i as u32).is_some() {
                return Err(invalid(format!("tree {} has node {} twice", tree_ids[i], node_ids[i])));
            }
        }
        let mut nodes = Vec::with_capacity(n);
        let mut has_parent = vec![false; n];
        let mut max_feature = 0usize;
        for i in 0..n {
            let mode = match &modes[i][..] {
                b"BRANCH_LEQ" => Mode::Leq,
                b"BRANCH_LT" => Mode::Lt,
                b"BRANCH_GTE" => Mode::Gte,
                b"BRANCH_GT" => Mode::Gt,
                b"BRANCH_EQ" => Mode::Eq,
                b"BRANCH_NEQ" => Mode::Neq,
                b"LEAF" => Mode::Leaf,
                other => return Err(invalid(format!("tree node mode {}", String::from_utf8_lossy(other)))),
            };
            let (mut true_child, mut false_child) = (0, 0);
            let feature =
                u32::try_from(features[i]).map_err(|_| invalid(format!("feature id {}", features[i])))?;
            if mode != Mode::Leaf {
                let child = |id: i64| {
                    index
                        .get(&(tree_ids[i], id))
                        .copied()
                        .ok_or_else(|| invalid(format!("tree {} has no node {id}", tree_ids[i])))
                };
                (true_child, false_child) = (child(trues[i])?, child(falses[i])?);
                has_parent[true_child as usize] = true;
                has_parent[false_child as usize] = true;
                max_feature = max_feature.max(feature as usize + 1);
            }
            nodes.push(Node {
                feature,
                threshold: thresholds.get(i).copied().unwrap_or(0.0),
                mode,
                missing_goes_true: missing.get(i).is_some_and(|m| *m != 0),
                true_child,
                false_child,
                weights_start: 0,
                weights_len: 0,
            });
        }
        let mut roots: Vec<u32> = (0..n as u32).filter(|i| !has_parent[*i as usize]).collect();
        roots.sort_by_key(|i| (tree_ids[*i as usize], node_ids[*i as usize]));
        if roots.is_empty() {
            return Err(invalid("tree ensemble has no root (its nodes form a cycle)"));
        }

        let prefix = if classifier { "class" } else { "target" };
        let (w_trees, w_nodes) =
            (attrs.ints(&format!("{prefix}_treeids")), attrs.ints(&format!("{prefix}_nodeids")));
        let (w_ids, w_values) =
            (attrs.ints(&format!("{prefix}_ids")), attrs.floats(&format!("{prefix}_weights")));
        if [w_nodes.len(), w_ids.len(), w_values.len()].iter().any(|l| *l != w_trees.len()) {
            return Err(invalid(format!("tree ensemble's {prefix}_* attributes differ in length")));
        }
        let (kind, outputs) = if classifier {
            let labels = Labels::parse(attrs, "classlabels_int64s", "classlabels_strings");
            let classes = labels.len();
            if classes < 2 {
                return Err(unsupported(format!("TreeEnsembleClassifier with {classes} class label(s)")));
            }
            let distinct: std::collections::BTreeSet<i64> = w_ids.iter().copied().collect();
            let all_positive = w_values.iter().all(|w| *w >= 0.0);
            (
                Kind::Classifier { labels, binary_case: classes == 2 && distinct.len() == 1, all_positive },
                classes,
            )
        } else {
            let aggregate = match attrs.string("aggregate_function", "SUM").as_str() {
                "SUM" => Aggregate::Sum,
                "AVERAGE" => Aggregate::Average,
                "MIN" => Aggregate::Min,
                "MAX" => Aggregate::Max,
                other => return Err(invalid(format!("aggregate_function {other}"))),
            };
            let targets = usize::try_from(attrs.int("n_targets", 1))
                .ok()
                .filter(|t| *t > 0)
                .ok_or_else(|| invalid("n_targets < 1"))?;
            (Kind::Regressor { aggregate }, targets)
        };
        // Leaf weights grouped by node, each group in the file's order.
        let mut per_node: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
        for k in 0..w_trees.len() {
            let node = *index.get(&(w_trees[k], w_nodes[k])).ok_or_else(|| {
                invalid(format!("weight for missing node {} of tree {}", w_nodes[k], w_trees[k]))
            })?;
            let id = usize::try_from(w_ids[k])
                .ok()
                .filter(|id| *id < outputs)
                .ok_or_else(|| invalid(format!("{prefix} id {} of {outputs}", w_ids[k])))?;
            per_node[node as usize].push((id as u32, w_values[k]));
        }
        let mut weights = Vec::with_capacity(w_trees.len());
        for (node, group) in nodes.iter_mut().zip(per_node) {
            node.weights_start = weights.len() as u32;
            node.weights_len = group.len() as u32;
            weights.extend(group);
        }
        let base_values = attrs.floats("base_values");
        Ok(Self {
            nodes,
            roots,
            weights,
            base_values,
            post: PostTransform::parse(attrs)?,
            outputs,
            features: max_feature,
            kind,
        })
    }

    pub(crate) fn label_is_string(&self) -> bool {
        matches!(&self.kind, Kind::Classifier { labels: Labels::Strings(_), .. })
    }

    /// The leaf a row reaches from `root`; a malformed cycle is cut off after as many steps as nodes.
    fn leaf(&self, root: u32, row: &[f32]) -> Result<&Node, TinyError> {
        let mut node = &self.nodes[root as usize];
        for _ in 0..=self.nodes.len() {
            if node.mode == Mode::Leaf {
                return Ok(node);
            }
            let x = row[node.feature as usize];
            let t = node.threshold;
            let goes_true = match node.mode {
                Mode::Leq => x <= t,
                Mode::Lt => x < t,
                Mode::Gte => x >= t,
                Mode::Gt => x > t,
                Mode::Eq => x == t,
                Mode::Neq => x != t,
                Mode::Leaf => true,
            } || (node.missing_goes_true && x.is_nan());
            node = &self.nodes[if goes_true { node.true_child } else { node.false_child } as usize];
        }
        Err(eval("tree ensemble has a cycle"))
    }

    /// Returns (label, scores) for a classifier, (scores) for a regressor.
    pub(crate) fn run(&self, x: &Value) -> Result<Vec<Value>, TinyError> {
        let (rows, cols) = match x.shape[..] {
            [c] => (1, c),
            [r, c] => (r, c),
            _ => {
                return Err(eval(format!("tree ensemble takes a 1-D or 2-D input, got shape {:?}", x.shape)));
            }
        };
        if cols < self.features {
            return Err(eval(format!("tree ensemble reads feature {} of rows of {cols}", self.features - 1)));
        }
        let input = x.to_f32()?;
        let mut z = Vec::with_capacity(rows * self.outputs);
        let mut labels = Vec::with_capacity(rows);
        let mut scores = vec![Score::default(); self.outputs];
        for r in 0..rows {
            let row = &input[r * cols..(r + 1) * cols];
            scores.iter_mut().for_each(|s| *s = Score::default());
            for root in &self.roots {
                let leaf = self.leaf(*root, row)?;
                let start = leaf.weights_start as usize;
                for (id, w) in &self.weights[start..start + leaf.weights_len as usize] {
                    let s = &mut scores[*id as usize];
                    s.value = match &self.kind {
                        Kind::Regressor { aggregate: Aggregate::Min } if s.set => s.value.min(*w),
                        Kind::Regressor { aggregate: Aggregate::Max } if s.set => s.value.max(*w),
                        Kind::Regressor { aggregate: Aggregate::Min | Aggregate::Max } => *w,
                        _ => s.value + w,
                    };
                    s.set = true;
                }
            }
            match &self.kind {
                Kind::Regressor { aggregate } => self.finish_regression(*aggregate, &mut scores, &mut z),
                Kind::Classifier { binary_case, all_positive, .. } => {
                    labels.push(self.finish_classification(*binary_case, *all_positive, &mut scores, &mut z));
                }
            }
        }
        let z = Value::new(vec![rows, self.outputs], Data::F32(z));
        Ok(match &self.kind {
            Kind::Regressor { .. } => vec![z],
            Kind::Classifier { labels: l, .. } => {
                let data = match l {
                    Labels::Ints(ints) => Data::I64(labels.iter().map(|p| p.resolve(ints)).collect()),
                    Labels::Strings(_) => l.pick(&labels.iter().map(|p| p.index()).collect::<Vec<_>>()),
                };
                vec![Value::new(vec![rows], data), z]
            }
        })
    }

    fn finish_regression(&self, aggregate: Aggregate, scores: &mut [Score], z: &mut Vec<f32>) {
        let trees = self.roots.len() as f32;
        if self.outputs == 1 {
            let origin = if self.base_values.len() == 1 { self.base_values[0] } else { 0.0 };
            let s = scores[0];
            let value = match aggregate {
                Aggregate::Sum => s.value + origin,
                Aggregate::Average => s.value / trees + origin,
                Aggregate::Min | Aggregate::Max if s.set => s.value + origin,
                Aggregate::Min | Aggregate::Max => origin,
            };
            z.push(if self.post == PostTransform::Probit { crate::ops::ml::probit(value) } else { value });
            return;
        }
        let use_base = self.base_values.len() == self.outputs;
        let mut row: Vec<f32> = scores
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let base = if use_base { self.base_values[k] } else { 0.0 };
                match aggregate {
                    Aggregate::Sum if s.set => s.value + base,
                    Aggregate::Average if s.set => s.value / trees + base,
                    Aggregate::Sum | Aggregate::Average => 0.0,
                    Aggregate::Min | Aggregate::Max => base + if s.set { s.value } else { 0.0 },
                }
            })
            .collect();
        write_scores(&mut row, self.post, None);
        z.extend_from_slice(&row);
    }

    fn finish_classification(
        &self,
        binary_case: bool,
        all_positive: bool,
        scores: &mut Vec<Score>,
        z: &mut Vec<f32>,
    ) -> Picked {
        let base = &self.base_values;
        let mut second = None;
        let picked = if self.outputs > 2 {
            for (k, b) in base.iter().enumerate().take(scores.len()) {
                let s = &mut scores[k];
                s.value = if s.set { s.value + b } else { *b };
                s.set = true;
            }
            let mut best: Option<usize> = None;
            for (k, s) in scores.iter().enumerate() {
                if s.set && best.is_none_or(|b| s.value > scores[b].value) {
                    best = Some(k);
                }
            }
            Picked::Index(best.unwrap_or(0))
        } else {
            if base.len() == 2 {
                if scores[1].set {
                    // ONNX Runtime's reading of two base values with a positive-class score.
                    scores[1].value = base[1] + scores[0].value;
                    scores[0].value = -scores[1].value;
                } else {
                    scores[1].value += base[1];
                    scores[0].value += base[0];
                }
            } else if base.len() == 1 {
                scores[0].value += base[0];
                if !scores[1].set {
                    scores.pop();
                }
            } else if base.is_empty() {
                second = Some(3);
                if !scores[1].set {
                    scores.pop();
                }
            }
            let (s0, s1) = (scores[0], scores.get(1).copied().filter(|s| s.set).unwrap_or_default());
            let positive = if s1.set {
                s1.value
            } else if s0.set {
                s0.value
            } else {
                0.0
            };
            if binary_case {
                let (wins, code) = if all_positive { (positive > 0.5, 0) } else { (positive > 0.0, 2) };
                second = Some(if wins { code } else { code + 1 });
                Picked::Index(usize::from(wins))
            } else {
                Picked::Raw(i64::from(positive > 0.0))
            }
        };
        let mut row: Vec<f32> = scores.iter().map(|s| if s.set { s.value } else { 0.0 }).collect();
        write_scores(&mut row, self.post, second);
        row.resize(self.outputs, 0.0);
        z.extend_from_slice(&row);
        scores.resize(self.outputs, Score::default());
        picked
    }
}

/// A classifier's pick: an index into the labels, or (ONNX Runtime's reading of two classes whose
/// weights name both) 1 or 0 itself.
#[derive(Debug, Clone, Copy)]
enum Picked {
    Index(usize),
    Raw(i64),
}

impl Picked {
    fn resolve(self, labels: &[i64]) -> i64 {
        match self {
            Picked::Index(i) => labels.get(i).copied().unwrap_or(0),
            Picked::Raw(v) => v,
        }
    }

    fn index(self) -> usize {
        match self {
            Picked::Index(i) => i,
            Picked::Raw(v) => v as usize,
        }
    }
}

impl TreeEnsemble {
    pub(crate) fn is_regressor(&self) -> bool {
        matches!(self.kind, Kind::Regressor { .. })
    }
}
