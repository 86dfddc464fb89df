//! Configuration read from the environment in one place, injectable in tests.
//!
//! Services never call `std::env::var` themselves: `main` takes one [`Env`] snapshot of the process
//! environment and hands it to the service's `Settings::from_env`. Tests build an [`Env`] from pairs
//! instead, so no test ever mutates the process environment (which is global and racy).

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use url::Url;

/// A snapshot of configuration variables.
///
/// It also remembers every key that was asked for, so a check can compare what a service reads
/// with what a deployment (the compose file) sets: a misspelt variable is caught in CI, not in
/// production.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
    read: Arc<Mutex<BTreeSet<String>>>,
}

/// A configuration variable that is present but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("configuration variable {key}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    /// The variable's name.
    pub key: String,
    /// The value that was rejected.
    pub value: String,
    /// Why it was rejected.
    pub reason: String,
}

impl Env {
    /// Snapshots the process environment.
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars().collect(),
            read: Arc::default(),
        }
    }

    /// Builds an environment from explicit pairs (for tests and tools).
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            read: Arc::default(),
        }
    }

    /// The raw value of `key`, if set and not empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned());
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// Every key looked up so far (by this value and its clones), sorted.
    pub fn keys_read(&self) -> Vec<String> {
        self.read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The value of `key`, or `default` when unset.
    pub fn string_or(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or(default).trim().to_owned()
    }

    /// The value of `key` parsed as `T`, or `default` when unset.
    ///
    /// # Errors
    /// Returns [`ConfigError`] when the variable is set but does not parse.
    pub fn parse_or<T>(&self, key: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|e: T::Err| ConfigError {
                key: key.to_owned(),
                value: raw.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// A duration given in whole milliseconds, or `default` when unset.
    ///
    /// # Errors
    /// Returns [`ConfigError`] when the variable is not a non-negative integer.
    pub fn millis_or(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let default_ms = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
        self.parse_or(key, default_ms).map(Duration::from_millis)
    }

    /// A comma-separated list of base URLs (several instances of one service for client-side
    /// load balancing), or `default` when unset.
    ///
    /// # Errors
    /// Returns [`ConfigError`] when an entry is not an absolute `http`/`https` URL.
    pub fn urls_or(&self, key: &str, default: &str) -> Result<Vec<Url>, ConfigError> {
        let raw = self.get(key).unwrap_or(default);
        let invalid = |reason: String| ConfigError {
            key: key.to_owned(),
            value: raw.to_owned(),
            reason,
        };
        let urls = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let url = Url::parse(s).map_err(|e| invalid(format!("{s}: {e}")))?;
                if matches!(url.scheme(), "http" | "https") {
                    Ok(url)
                } else {
                    Err(invalid(format!("{s}: scheme must be http or https")))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err(invalid("no URL given".to_owned()));
        }
        Ok(urls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_variables_fall_back_to_their_defaults() {
        let env = Env::from_pairs([("EMPTY", " ")]);
        assert_eq!(env.string_or("MISSING", "x"), "x");
        assert_eq!(env.string_or("EMPTY", "y"), "y");
        assert_eq!(env.parse_or("MISSING", 7_u16).ok(), Some(7));
        assert_eq!(env.keys_read(), ["EMPTY", "MISSING"]);
    }

    #[test]
    fn a_malformed_number_is_reported_with_its_name() {
        let env = Env::from_pairs([("PORT", "eighty")]);
        let err = env.parse_or::<u16>("PORT", 80).expect_err("must fail");
        assert!(err.to_string().contains("PORT"), "{err}");
    }

    #[test]
    fn url_lists_are_split_on_commas() {
        let env = Env::from_pairs([("INVENTORY_URL", "http://a:1, http://b:2")]);
        let urls = env.urls_or("INVENTORY_URL", "http://x:3").expect("valid");
        assert_eq!(urls.len(), 2);
        assert_eq!(urls[1].as_str(), "http://b:2/");
        assert!(env.urls_or("BAD", "ftp://x").is_err());
    }
}
