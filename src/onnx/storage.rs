//! How weight tensors are stored in the ONNX file: f32 as they are, f16 followed by a `Cast`,
//! or int8 per output channel (symmetric, weight-only) followed by a `DequantizeLinear`.
//!
//! Only the matrices and kernels (`*.weight`, rank >= 2) are converted; biases stay f32. The
//! graph computes in f32 in every case: the conversion nodes rebuild each weight once from its
//! stored form, so the stored form only changes the file size and the weights' rounding.
//! [`WeightStorage::round_trip`] gives exactly the f32 weights the graph will use, so a
//! reference forward pass (tch in the exporter, plain loops in the tests) can be compared with
//! ONNX Runtime to the usual f32 tolerance.

use super::proto::tensor_proto::DataType;
use std::io::Write;

/// How weights are stored in the written ONNX file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightStorage {
    /// f32 initializers (4 bytes per value, exact).
    #[default]
    Fp32,
    /// f16 initializers and a `Cast` to f32 (2 bytes per value; round to nearest even).
    Fp16,
    /// int8 initializers with one f32 scale per output channel and a `DequantizeLinear`
    /// (1 byte per value; symmetric, zero point 0, `scale = max|w| / 127` per channel).
    Int8,
}

impl WeightStorage {
    /// `fp32`, `fp16` or `int8`.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightStorage::Fp32 => "fp32",
            WeightStorage::Fp16 => "fp16",
            WeightStorage::Int8 => "int8",
        }
    }

    /// Whether the parameter of this name and shape is stored converted (rank >= 2 `weight`s
    /// under fp16 and int8) rather than as f32.
    pub fn converts(self, name: &str, shape: &[usize]) -> bool {
        self != WeightStorage::Fp32 && name.ends_with(".weight") && shape.len() >= 2
    }

    /// The f32 values the graph computes with for a parameter stored this way: `values`
    /// rounded to f16, or quantised to int8 per output channel and scaled back.
    pub fn round_trip(self, name: &str, shape: &[usize], values: &[f32]) -> Vec<f32> {
        if !self.converts(name, shape) {
            return values.to_vec();
        }
        match self {
            WeightStorage::Fp32 => values.to_vec(),
            WeightStorage::Fp16 => values
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect(),
            WeightStorage::Int8 => {
                let (q, scales) = quantize_int8(values, shape[0]);
                let per_channel = values.len() / scales.len().max(1);
                q.iter()
                    .enumerate()
                    .map(|(k, &v)| f32::from(v) * scales[k / per_channel.max(1)])
                    .collect()
            }
        }
    }
}

impl std::str::FromStr for WeightStorage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Ok(WeightStorage::Fp32),
            "fp16" | "f16" => Ok(WeightStorage::Fp16),
            "int8" | "i8" => Ok(WeightStorage::Int8),
            other => Err(format!(
                "unknown weight storage {other:?}; expected fp32, fp16 or int8"
            )),
        }
    }
}

impl std::fmt::Display for WeightStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Symmetric per-channel int8 quantisation of a tensor whose first dimension has `channels`
/// entries: returns the int8 values (in `[-127, 127]`) and one scale per channel. A channel of
/// zeros gets scale 1 (its values stay 0).
pub fn quantize_int8(values: &[f32], channels: usize) -> (Vec<i8>, Vec<f32>) {
    let channels = channels.max(1);
    let per_channel = (values.len() / channels).max(1);
    let mut q = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(channels);
    for chunk in values.chunks(per_channel) {
        let max = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 && max.is_finite() {
            max / 127.0
        } else {
            1.0
        };
        scales.push(scale);
        q.extend(
            chunk
                .iter()
                .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8),
        );
    }
    (q, scales)
}

/// One initializer written for a parameter: its name, dims, element type and byte length.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub data_type: DataType,
    pub raw_len: usize,
}

/// What is stored for one parameter and how the graph gets its f32 value back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredParameter {
    /// The parameter's name as the graph's nodes use it (`features.0.weight`).
    pub name: String,
    pub shape: Vec<usize>,
    pub storage: WeightStorage,
    /// The initializers written for it, in file order.
    pub tensors: Vec<StoredTensor>,
}

impl StoredParameter {
    /// The layout of parameter `name` with `shape` under `storage`.
    pub fn new(name: &str, shape: &[usize], storage: WeightStorage) -> Self {
        let n: usize = shape.iter().product();
        let tensor = |suffix: &str, dims: Vec<usize>, data_type, raw_len| StoredTensor {
            name: format!("{name}{suffix}"),
            dims,
            data_type,
            raw_len,
        };
        let storage = if storage.converts(name, shape) {
            storage
        } else {
            WeightStorage::Fp32
        };
        let tensors = match storage {
            WeightStorage::Fp32 => vec![tensor("", shape.to_vec(), DataType::Float, n * 4)],
            WeightStorage::Fp16 => {
                vec![tensor("_fp16", shape.to_vec(), DataType::Float16, n * 2)]
            }
            WeightStorage::Int8 => vec![
                tensor("_int8", shape.to_vec(), DataType::Int8, n),
                tensor("_scale", vec![shape[0]], DataType::Float, shape[0] * 4),
            ],
        };
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            storage,
            tensors,
        }
    }

    /// Writes the raw bytes of `self.tensors[k]` for `values` (the parameter's f32 values).
    pub fn write_raw<O: Write>(
        &self,
        k: usize,
        values: &[f32],
        cache: &mut Option<(Vec<i8>, Vec<f32>)>,
        out: &mut O,
    ) -> std::io::Result<()> {
        match (self.storage, k) {
            (WeightStorage::Fp32, _) => write_le(values, 4, |v, b| b.extend(v.to_le_bytes()), out),
            (WeightStorage::Fp16, _) => write_le(
                values,
                2,
                |v, b| b.extend(half::f16::from_f32(*v).to_le_bytes()),
                out,
            ),
            (WeightStorage::Int8, k) => {
                let (q, scales) = cache.get_or_insert_with(|| quantize_int8(values, self.shape[0]));
                if k == 0 {
                    let bytes: Vec<u8> = q.iter().map(|&v| v as u8).collect();
                    out.write_all(&bytes)
                } else {
                    write_le(scales, 4, |v, b| b.extend(v.to_le_bytes()), out)
                }
            }
        }
    }
}

/// Writes `values` in bounded chunks, each value encoded by `encode` into `width` bytes.
fn write_le<T, O: Write>(
    values: &[T],
    width: usize,
    encode: impl Fn(&T, &mut Vec<u8>),
    out: &mut O,
) -> std::io::Result<()> {
    const CHUNK: usize = 16 * 1024;
    let mut buf = Vec::with_capacity(CHUNK * width);
    for chunk in values.chunks(CHUNK) {
        buf.clear();
        for v in chunk {
            encode(v, &mut buf);
        }
        out.write_all(&buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_is_per_channel_and_symmetric() {
        let values = [0.5, -1.0, 0.25, 0.0, 0.0, 0.0, 2.0, 1.0, -0.5];
        let (q, scales) = quantize_int8(&values, 3);
        assert_eq!(scales, vec![1.0 / 127.0, 1.0, 2.0 / 127.0]);
        assert_eq!(q, vec![64, -127, 32, 0, 0, 0, 127, 64, -32]);
        let back = WeightStorage::Int8.round_trip("a.weight", &[3, 3], &values);
        for (b, v) in back.iter().zip(values) {
            assert!((b - v).abs() <= 0.5 * 2.0 / 127.0 + 1e-7, "{b} vs {v}");
        }
    }

    #[test]
    fn biases_and_vectors_stay_f32() {
        let values = [0.123_456_79f32, -3.3];
        for s in [WeightStorage::Fp16, WeightStorage::Int8] {
            assert_eq!(s.round_trip("a.bias", &[2], &values), values);
            assert_eq!(s.round_trip("a.weight", &[2], &values), values);
            assert_eq!(StoredParameter::new("a.bias", &[2], s).tensors.len(), 1);
        }
        let fp16 = WeightStorage::Fp16.round_trip("a.weight", &[1, 2], &values);
        assert_ne!(fp16[0], values[0]);
        assert!((fp16[0] - values[0]).abs() < 1e-3);
    }

    #[test]
    fn parses_names() {
        assert_eq!("INT8".parse::<WeightStorage>(), Ok(WeightStorage::Int8));
        assert!("int4".parse::<WeightStorage>().is_err());
    }
}
