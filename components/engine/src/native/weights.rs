//! Safetensors weights: `model.safetensors`, or the shards a `model.safetensors.index.json`
//! names. Files are memory-mapped; each tensor is checked (dtype, shape, bounds) and converted
//! to the compute type when the model takes it, so a corrupt or truncated file is an error
//! naming the file and tensor, never a crash or garbage.
//!
//! Also writes safetensors files (`make-model` presets with deterministic random weights).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::Value;

use super::NativeError;

pub const SINGLE: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::Bf16),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
        }
    }
}

struct TensorInfo {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

/// The tensors of a model folder, memory-mapped.
pub struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorInfo>,
}

fn corrupt(path: &Path, msg: impl std::fmt::Display) -> NativeError {
    NativeError::Weights(format!("{}: {msg}", path.display()))
}

impl Weights {
    /// Opens the weights in `dir` (single file or sharded index).
    pub fn open(dir: &Path) -> Result<Self, NativeError> {
        let index = dir.join(INDEX);
        let paths: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| corrupt(&index, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| corrupt(&index, e))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| corrupt(&index, "no \"weight_map\" object"))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            for s in &shards {
                if s.contains('/') || s.contains("..") {
                    return Err(corrupt(
                        &index,
                        format!("shard name {s:?} leaves the folder"),
                    ));
                }
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if dir.join(SINGLE).is_file() {
            vec![dir.join(SINGLE)]
        } else {
            return Err(NativeError::Weights(format!(
                "{} has neither {SINGLE} nor {INDEX}; the native engine needs safetensors weights (make-model --preset tiny writes some)",
                dir.display()
            )));
        };
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| corrupt(&path, e))?;
            // SAFETY: the map is read-only and private to this process; the files are model
            // weights nobody should modify while we serve them. A concurrent truncation could
            // fault; copying every tensor out at load keeps that window to loading.
            #[allow(unsafe_code)]
            let map = unsafe { Mmap::map(&file) }.map_err(|e| corrupt(&path, e))?;
            parse_header(&path, &map, i, &mut tensors)?;
            files.push((path, map));
        }
        Ok(Self { files, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Total bytes of tensor data.
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|t| t.end - t.start).sum()
    }

    /// The dtype holding most of the tensor bytes (the weight matrices': a checkpoint may keep
    /// its norms in f32).
    pub fn dtype(&self) -> Option<Dtype> {
        let mut counts: HashMap<&'static str, (usize, Dtype)> = HashMap::new();
        for t in self.tensors.values() {
            counts.entry(t.dtype.name()).or_insert((0, t.dtype)).0 += t.end - t.start;
        }
        counts.into_values().max_by_key(|c| c.0).map(|c| c.1)
    }

    fn info(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo, NativeError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| NativeError::MissingTensor(name.to_string()))?;
        if t.shape != shape {
            return Err(NativeError::Weights(format!(
                "tensor {name} has shape {:?}, the config needs {shape:?} ({})",
                t.shape,
                self.files[t.file].0.display()
            )));
        }
        Ok(t)
    }

    /// Tensor `name` of exactly `shape`, as f32.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, NativeError> {
        let t = self.info(name, shape)?;
        let bytes = &self.files[t.file].1[t.start..t.end];
        let out: Vec<f32> = match t.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        if let Some(bad) = out.iter().position(|x| !x.is_finite()) {
            return Err(NativeError::Weights(format!(
                "tensor {name} holds a non-finite value ({}) at element {bad}: the weights are corrupt",
                out[bad]
            )));
        }
        Ok(out)
    }
}

fn parse_header(
    path: &Path,
    map: &[u8],
    file: usize,
    out: &mut HashMap<String, TensorInfo>,
) -> Result<(), NativeError> {
    if map.len() < 8 {
        return Err(corrupt(
            path,
            "shorter than a safetensors header (truncated?)",
        ));
    }
    let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes")) as usize;
    if n > map.len() - 8 || n > 100 << 20 {
        return Err(corrupt(
            path,
            format!("header length {n} exceeds the file (truncated or not safetensors)"),
        ));
    }
    let header: BTreeMap<String, Value> = serde_json::from_slice(&map[8..8 + n])
        .map_err(|e| corrupt(path, format!("header is not JSON: {e}")))?;
    let data = 8 + n;
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = v.get("dtype").and_then(Value::as_str).unwrap_or("?");
        let dtype = Dtype::parse(dtype_name).ok_or_else(|| {
            corrupt(
                path,
                format!("tensor {name} has dtype {dtype_name} (supported: F32, F16, BF16)"),
            )
        })?;
        let numbers = |key: &str| -> Option<Vec<usize>> {
            let a = v.get(key)?.as_array()?;
            Some(
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as usize)
                    .collect(),
            )
        };
        let shape =
            numbers("shape").ok_or_else(|| corrupt(path, format!("tensor {name} has no shape")))?;
        let offsets = numbers("data_offsets").unwrap_or_default();
        let [begin, end] = offsets[..] else {
            return Err(corrupt(path, format!("tensor {name} has no data_offsets")));
        };
        let elements = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let expected = elements.and_then(|e| e.checked_mul(dtype.size()));
        if begin > end || Some(end - begin) != expected {
            return Err(corrupt(
                path,
                format!(
                    "tensor {name}: {} bytes for shape {shape:?} {dtype_name}",
                    end.wrapping_sub(begin)
                ),
            ));
        }
        if data + end > map.len() {
            return Err(corrupt(
                path,
                format!("tensor {name} ends past the end of the file (truncated)"),
            ));
        }
        out.insert(
            name,
            TensorInfo {
                file,
                dtype,
                shape,
                start: data + begin,
                end: data + end,
            },
        );
    }
    Ok(())
}

/// Writes f32 tensors to a safetensors file as `dtype` (F32, F16 or BF16).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: Dtype,
) -> Result<(), NativeError> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let len = data.len() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype.name(),
                "shape": shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut text = serde_json::to_vec(&Value::Object(header)).map_err(|e| corrupt(path, e))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let io = |e: std::io::Error| corrupt(path, e);
    let mut f = std::io::BufWriter::new(File::create(path).map_err(io)?);
    f.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&text).map_err(io)?;
    for (_, _, data) in tensors {
        for &x in data {
            match dtype {
                Dtype::F32 => f.write_all(&x.to_le_bytes()),
                Dtype::F16 => f.write_all(&f16::from_f32(x).to_le_bytes()),
                Dtype::Bf16 => f.write_all(&bf16::from_f32(x).to_le_bytes()),
            }
            .map_err(io)?;
        }
    }
    f.flush().map_err(io)
}
