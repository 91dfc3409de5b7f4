//! Model folders as Hugging Face lays them out, and what the preprocessor needs from them.
//!
//! A worker reads its folder with [`ModelFolder::load`] and publishes a [`ModelCard`] naming
//! the files by content hash; a frontend fetches those files over the bus and builds a
//! [`crate::Preprocessor`] from them with [`ModelFiles`]. Both sides parse the same bytes, so
//! they agree on the tokenizer, the template and the limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dynamo_protocols::llm::{ModelCard, ModelFile};
use serde_json::Value;

pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";
pub const CONFIG: &str = "config.json";
/// Newer folders keep the chat template in its own file.
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";

/// Context length when neither `config.json` nor `tokenizer_config.json` states one.
const DEFAULT_CONTEXT: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{file} is required in a model folder (as Hugging Face lays it out) but is missing")]
    Missing { file: &'static str },
    #[error("{file}: {reason}")]
    Invalid { file: &'static str, reason: String },
}

/// A file's content hash: XXH3-128, 32 lowercase hex digits.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// The preprocessor's files, by name, with their bytes. Cheap to clone: the workers of a
/// process share one copy (a tokenizer is hundreds of KB, and a process may host thousands).
#[derive(Debug, Clone, Default)]
pub struct ModelFiles {
    /// Name -> (content hash, bytes); the hash is computed once, on insert.
    files: std::sync::Arc<BTreeMap<String, (String, Vec<u8>)>>,
}

impl ModelFiles {
    pub fn insert(&mut self, name: &str, bytes: Vec<u8>) {
        std::sync::Arc::make_mut(&mut self.files)
            .insert(name.to_string(), (content_hash(&bytes), bytes));
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.files.get(name).map(|(_, b)| b.as_slice())
    }

    /// The content hash of a file.
    pub fn hash(&self, name: &str) -> Option<&str> {
        self.files.get(name).map(|(h, _)| h.as_str())
    }

    pub(crate) fn json(&self, file: &'static str) -> Result<Option<Value>, ModelError> {
        match self.get(file) {
            None => Ok(None),
            Some(b) => serde_json::from_slice(b)
                .map(Some)
                .map_err(|e| ModelError::Invalid {
                    file,
                    reason: e.to_string(),
                }),
        }
    }

    /// The context length: `config.json` (`max_position_embeddings`, `max_sequence_length`,
    /// `n_positions`), else `tokenizer_config.json` `model_max_length`, else 2048.
    pub fn context_length(&self) -> Result<u32, ModelError> {
        let from = |v: &Option<Value>, keys: &[&str]| {
            let v = v.as_ref()?;
            keys.iter()
                .find_map(|k| v.get(*k).and_then(Value::as_u64))
                .filter(|&n| n > 0)
        };
        let config = self.json(CONFIG)?;
        let tok = self.json(TOKENIZER_CONFIG)?;
        let n = from(
            &config,
            &[
                "max_position_embeddings",
                "max_sequence_length",
                "n_positions",
            ],
        )
        .or_else(|| from(&tok, &["model_max_length"]))
        .unwrap_or(DEFAULT_CONTEXT as u64);
        Ok(n.min(u32::MAX as u64) as u32)
    }

    /// Describes the files for a card.
    pub fn card(
        &self,
        name: &str,
        kv_block_size: u32,
        kv_total_blocks: u64,
    ) -> Result<ModelCard, ModelError> {
        Ok(ModelCard {
            name: name.to_string(),
            context_length: self.context_length()?,
            kv_block_size,
            kv_total_blocks,
            files: self
                .files
                .iter()
                .map(|(name, (hash, bytes))| ModelFile {
                    name: name.clone(),
                    hash: hash.clone(),
                    size: bytes.len() as u64,
                })
                .collect(),
        })
    }

    /// The bytes of the file with this content hash.
    pub fn by_hash(&self, hash: &str) -> Option<&[u8]> {
        self.files
            .values()
            .find(|(h, _)| h == hash)
            .map(|(_, b)| b.as_slice())
    }
}

/// A model folder on disk.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    path: PathBuf,
    files: ModelFiles,
}

impl ModelFolder {
    /// Reads the preprocessor's files. `tokenizer.json` is required; the others are optional.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        if !path.is_dir() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                reason: "not a directory; pass a Hugging Face model folder (`dynamo-run make-model --out DIR` writes one)".into(),
            });
        }
        let mut files = ModelFiles::default();
        for name in [
            TOKENIZER,
            TOKENIZER_CONFIG,
            GENERATION_CONFIG,
            CONFIG,
            CHAT_TEMPLATE,
        ] {
            let p = path.join(name);
            match std::fs::read(&p) {
                Ok(bytes) => files.insert(name, bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ModelError::Io {
                        path: p,
                        reason: e.to_string(),
                    })
                }
            }
        }
        if files.get(TOKENIZER).is_none() {
            return Err(ModelError::Missing { file: TOKENIZER });
        }
        Ok(Self {
            path: path.to_path_buf(),
            files,
        })
    }

    /// The folder's name: the default served model name.
    pub fn default_name(&self) -> String {
        self.path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".to_string())
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }
}
