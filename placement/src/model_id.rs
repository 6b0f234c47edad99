//! Model ids: validated once at the edge, so no later code can meet one that escapes a path.

use std::fmt;
use std::sync::Arc;

/// The longest id accepted, so an id always fits a DNS-label-like key and a file name.
pub const MAX_LEN: usize = 253;

/// A model's id: 1–253 characters of `[A-Za-z0-9._:-]`, never `.` or `..`, so it is safe as a path
/// component and an etcd key segment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(Arc<str>);

/// Why a string is not a model id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidModelId {
    #[error("model id is empty")]
    Empty,
    #[error("model id is {len} characters long; the limit is {MAX_LEN}")]
    TooLong { len: usize },
    #[error(
        "model id {id:?} has the character {ch:?}; only letters, digits, '.', '_', ':' and '-' are allowed"
    )]
    BadCharacter { id: String, ch: char },
    #[error("model id {0:?} is reserved")]
    Reserved(String),
}

impl ModelId {
    /// Validates `id`.
    pub fn new(id: &str) -> Result<Self, InvalidModelId> {
        if id.is_empty() {
            return Err(InvalidModelId::Empty);
        }
        let len = id.chars().count();
        if len > MAX_LEN {
            return Err(InvalidModelId::TooLong { len });
        }
        if let Some(ch) =
            id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            let shown: String = id.chars().take(64).collect();
            return Err(InvalidModelId::BadCharacter { id: shown, ch });
        }
        if id == "." || id == ".." {
            return Err(InvalidModelId::Reserved(id.to_owned()));
        }
        Ok(Self(id.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::str::FromStr for ModelId {
    type Err = InvalidModelId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "iris-logreg", "model_1.onnx", "ns:model:v2", "...", "a..b", &"x".repeat(253)] {
            assert_eq!(ModelId::new(ok).map(|m| m.to_string()), Ok(ok.to_owned()));
        }
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(ModelId::new(""), Err(InvalidModelId::Empty));
        assert_eq!(ModelId::new(&"x".repeat(254)), Err(InvalidModelId::TooLong { len: 254 }));
        assert_eq!(ModelId::new("."), Err(InvalidModelId::Reserved(".".into())));
        assert_eq!(ModelId::new(".."), Err(InvalidModelId::Reserved("..".into())));
        for bad in ["a/b", "../etc", "a b", "a\0b", "é", "a\\b", "a\nb", "%2e%2e"] {
            assert!(matches!(ModelId::new(bad), Err(InvalidModelId::BadCharacter { .. })), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn a_valid_id_is_one_safe_path_component(s in "\\PC{0,300}") {
            if let Ok(id) = ModelId::new(&s) {
                let path = std::path::Path::new(id.as_str());
                let mut components = path.components();
                proptest::prop_assert!(matches!(components.next(), Some(std::path::Component::Normal(_))));
                proptest::prop_assert!(components.next().is_none());
            }
        }
    }
}
