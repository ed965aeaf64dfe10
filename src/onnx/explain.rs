//! In-graph explanation outputs: the Grad-CAM map of the last conv block for the leukemia logit,
//! and the penultimate features (for the out-of-distribution score).
//!
//! The head is dense layers with ReLU, so the gradient of the logit with respect to the pooled
//! conv features is a chain of masked matrix products, written as plain ONNX nodes:
//! `g = W_last`; for each hidden layer from the top, `g = (g * [h_k > 0]) @ W_k`; then
//! `alpha = mean_{ij} g` per channel and `gradcam = ReLU(sum_c alpha_c * A_c)` on the pooled
//! map `A` (`[N, C, S, S]`, after the last max-pool). [`ExplainPlan::append`] adds these nodes to
//! a graph the writer is building, and [`add_explain_outputs`] to an existing LeukNet file.

use super::proto::{
    tensor_proto::DataType, AttributeProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
};
use super::writer::{
    attr_int, attr_ints, f32_tensor, int64_tensor, value_info, Dim, LeukNetSpec, OnnxWriteError,
    VggLayer,
};

/// Name of the Grad-CAM output, `[batch, side, side]`, non-negative, not normalised.
pub const GRADCAM_OUTPUT: &str = "gradcam";
/// Name of the penultimate-features output, `[batch, last hidden width]` (after ReLU).
pub const FEATURES_OUTPUT: &str = "features";
/// Name of the pooled conv features, `[batch, channels]`: the last block's output (after its
/// max-pool) averaged over space, a generic image descriptor for the OOD score.
pub const POOLED_OUTPUT: &str = "pooled";

/// Which tensors of a LeukNet graph the explanation nodes read, by name.
#[derive(Debug, Clone, PartialEq)]
pub struct ExplainPlan {
    /// The pooled conv features `[N, channels, side, side]` (the last max-pool's output).
    pub pooled: String,
    /// The flattened pooled features (the features output when the head has no hidden layer).
    pub flattened: String,
    /// Channels of the pooled map.
    pub channels: usize,
    /// Side of the pooled map.
    pub side: usize,
    /// Per hidden layer, bottom to top: (its ReLU output `[N, out]`, its weight `[out, in]`).
    pub hidden: Vec<(String, String)>,
    /// The last Linear's weight `[1, in]`.
    pub last_weight: String,
    /// Width of the features output.
    pub feature_width: usize,
}

impl ExplainPlan {
    /// The names the writer gives a graph of `spec` (torchvision numbering).
    pub fn for_spec(spec: &LeukNetSpec) -> Self {
        let mut index = 0usize;
        for layer in &spec.conv {
            index += match layer {
                VggLayer::Conv(_) => 2,
                VggLayer::MaxPool => 1,
            };
        }
        let hidden = (0..spec.head.len())
            .map(|k| {
                (
                    format!("classifier.{}.out", 3 * k + 1),
                    format!("classifier.{}.weight", 3 * k),
                )
            })
            .collect();
        ExplainPlan {
            pooled: format!("features.{}.out", index.saturating_sub(1)),
            flattened: "flatten.out".into(),
            channels: spec.last_channels(),
            side: spec.final_side(),
            hidden,
            last_weight: format!("classifier.{}.weight", 3 * spec.head.len()),
            feature_width: spec.head.last().copied().unwrap_or(spec.flatten_size()),
        }
    }

    /// The outputs [`ExplainPlan::append`] adds: gradcam `[batch, side, side]`, features
    /// `[batch, width]`, pooled `[batch, channels]`.
    pub fn output_shapes(&self) -> [(&'static str, Vec<i64>); 3] {
        let side = self.side as i64;
        [
            (GRADCAM_OUTPUT, vec![-1, side, side]),
            (FEATURES_OUTPUT, vec![-1, self.feature_width as i64]),
            (POOLED_OUTPUT, vec![-1, self.channels as i64]),
        ]
    }

    /// Appends the Grad-CAM, features and pooled nodes (and their small constants) and returns
    /// the three graph outputs to declare.
    pub fn append(
        &self,
        nodes: &mut Vec<NodeProto>,
        constants: &mut Vec<TensorProto>,
    ) -> Vec<ValueInfoProto> {
        let mut push = |op: &str, name: &str, inputs: &[&str], attrs: Vec<AttributeProto>| {
            let output = format!("explain.{name}");
            nodes.push(NodeProto {
                op_type: Some(op.into()),
                name: Some(format!("explain.{name}")),
                input: inputs.iter().map(|s| s.to_string()).collect(),
                output: vec![output.clone()],
                attribute: attrs,
                ..Default::default()
            });
            output
        };
        constants.push(f32_tensor("explain.zero", &[], &[0.0]));
        let shape = [
            -1i64,
            self.channels as i64,
            self.side as i64,
            self.side as i64,
        ];
        constants.push(int64_tensor("explain.grad_shape", &[4], &shape));
        constants.push(int64_tensor("explain.channel_axis", &[1], &[1]));

        let mut grad = self.last_weight.clone();
        for (k, (relu_out, weight)) in self.hidden.iter().enumerate().rev() {
            let positive = push(
                "Greater",
                &format!("h{k}.positive"),
                &[relu_out, "explain.zero"],
                vec![],
            );
            let mask = push(
                "Cast",
                &format!("h{k}.mask"),
                &[&positive],
                vec![attr_int("to", DataType::Float as i64)],
            );
            let masked = push("Mul", &format!("h{k}.masked"), &[&grad, &mask], vec![]);
            grad = push(
                "MatMul",
                &format!("h{k}.grad_in"),
                &[&masked, weight],
                vec![],
            );
        }
        let grad_map = push(
            "Reshape",
            "grad_map",
            &[&grad, "explain.grad_shape"],
            vec![],
        );
        let alpha = push(
            "ReduceMean",
            "alpha",
            &[&grad_map],
            vec![attr_ints("axes", &[2, 3]), attr_int("keepdims", 1)],
        );
        let weighted = push("Mul", "weighted", &[&alpha, &self.pooled], vec![]);
        let summed = push(
            "ReduceSum",
            "summed",
            &[&weighted, "explain.channel_axis"],
            vec![attr_int("keepdims", 0)],
        );
        nodes.push(NodeProto {
            op_type: Some("Relu".into()),
            name: Some("explain.gradcam".into()),
            input: vec![summed],
            output: vec![GRADCAM_OUTPUT.into()],
            ..Default::default()
        });
        let features = self
            .hidden
            .last()
            .map(|(relu_out, _)| relu_out.clone())
            .unwrap_or_else(|| self.flattened.clone());
        nodes.push(NodeProto {
            op_type: Some("Identity".into()),
            name: Some("explain.features".into()),
            input: vec![features],
            output: vec![FEATURES_OUTPUT.into()],
            ..Default::default()
        });
        nodes.push(NodeProto {
            op_type: Some("ReduceMean".into()),
            name: Some("explain.pooled".into()),
            input: vec![self.pooled.clone()],
            output: vec![POOLED_OUTPUT.into()],
            attribute: vec![attr_ints("axes", &[2, 3]), attr_int("keepdims", 0)],
            ..Default::default()
        });
        self.output_shapes()
            .iter()
            .map(|(name, shape)| float_value_info(name, shape))
            .collect()
    }

    /// Every tensor name the plan reads.
    fn reads(&self) -> Vec<&str> {
        let mut names = vec![
            self.pooled.as_str(),
            self.flattened.as_str(),
            self.last_weight.as_str(),
        ];
        for (relu_out, weight) in &self.hidden {
            names.push(relu_out);
            names.push(weight);
        }
        names
    }
}

/// Adds the explanation outputs to an existing LeukNet model (written by this crate without
/// them), leaving every other node, weight and output as it was. Fails if the model already
/// has them or lacks a tensor the plan reads.
pub fn add_explain_outputs(
    model: &mut ModelProto,
    plan: &ExplainPlan,
) -> Result<(), OnnxWriteError> {
    let invalid = |m: String| OnnxWriteError::InvalidSpec(m);
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| invalid("the model has no graph".into()))?;
    if graph.output.iter().any(|o| {
        matches!(
            o.name.as_deref(),
            Some(GRADCAM_OUTPUT | FEATURES_OUTPUT | POOLED_OUTPUT)
        )
    }) {
        return Err(invalid(
            "the model already has the explanation outputs".into(),
        ));
    }
    for name in plan.reads() {
        let produced = graph
            .node
            .iter()
            .any(|n| n.output.iter().any(|o| o == name))
            || graph
                .initializer
                .iter()
                .any(|t| t.name.as_deref() == Some(name));
        if !produced {
            return Err(invalid(format!(
                "the graph has no tensor {name:?}: not a LeukNet graph of this architecture"
            )));
        }
    }
    let outputs = plan.append(&mut graph.node, &mut graph.initializer);
    graph.output.extend(outputs);
    Ok(())
}

/// An f32 graph output; `-1` marks the batch dimension.
fn float_value_info(name: &str, shape: &[i64]) -> ValueInfoProto {
    let dims: Vec<Dim> = shape
        .iter()
        .map(|&d| if d < 0 { Dim::Batch } else { Dim::Fixed(d) })
        .collect();
    value_info(name, &dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vgg16_plan_reads_pool5_and_both_hidden_layers() {
        let spec = LeukNetSpec::vgg16();
        let plan = ExplainPlan::for_spec(&spec);
        assert_eq!(plan.pooled, "features.30.out");
        assert_eq!(plan.channels, 512);
        assert_eq!(plan.side, 7);
        assert_eq!(
            plan.hidden,
            vec![
                (
                    "classifier.1.out".to_string(),
                    "classifier.0.weight".to_string()
                ),
                (
                    "classifier.4.out".to_string(),
                    "classifier.3.weight".to_string()
                ),
            ]
        );
        assert_eq!(plan.last_weight, "classifier.6.weight");
        assert_eq!(plan.feature_width, 256);
    }

    #[test]
    fn adding_twice_or_to_a_foreign_graph_fails() {
        let mut model = ModelProto::default();
        let plan = ExplainPlan::for_spec(&LeukNetSpec::vgg16());
        assert!(add_explain_outputs(&mut model, &plan).is_err());
        model.graph = Some(Default::default());
        let err = add_explain_outputs(&mut model, &plan).unwrap_err();
        assert!(err.to_string().contains("no tensor"), "{err}");
    }
}
