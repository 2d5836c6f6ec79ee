//! Pulls the context id out of a request: the `contextID` query parameter first, then the
//! `contextID` header (both names configurable), as the Linkis gateway does.
//!
//! The value is either a bare HAID or the Gson-serialized `HAWorkFlowContextID` wrapper that
//! Linkis clients send: `{"type":"HAWorkFlowContextID","value":"{\"contextId\":\"<HAID>\",...}"}`.
//! This module only finds and unwraps the text; `haid` decodes it. No IO, no pingora.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;
use serde::Deserialize;

/// Why the context id could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextIdError {
    /// The header value or decoded query value is not UTF-8.
    #[error("the context id is not valid UTF-8")]
    NotUtf8,
    /// The value looks like JSON but is not a context-id wrapper.
    #[error("the context id is JSON but not a HAWorkFlowContextID wrapper: {0}")]
    BadWrapper(String),
}

/// Finds the raw context id value: query parameter `query_name` in `query` (the part of the
/// URI after `?`), else the header value. Query values are percent-decoded; `+` stays `+`
/// (HAIDs carry Base64 aliases, and Linkis clients send `%2B` when they mean it).
/// A blank value counts as absent, as Linkis treats a blank context id as no context id.
pub fn find<'a>(
    query: Option<&'a str>,
    query_name: &str,
    header: Option<&'a [u8]>,
) -> Result<Option<Cow<'a, str>>, ContextIdError> {
    if let Some(q) = query {
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == query_name {
                let v = percent_decode_str(v)
                    .decode_utf8()
                    .map_err(|_| ContextIdError::NotUtf8)?;
                if !v.trim().is_empty() {
                    return Ok(Some(v));
                }
            }
        }
    }
    match header {
        Some(bytes) => std::str::from_utf8(bytes)
            .map(|s| (!s.trim().is_empty()).then_some(Cow::Borrowed(s)))
            .map_err(|_| ContextIdError::NotUtf8),
        None => Ok(None),
    }
}

/// The Gson wrapper: `value` is itself a JSON document.
#[derive(Deserialize)]
struct Wrapper {
    #[serde(default)]
    value: Option<String>,
    #[serde(default, rename = "contextId")]
    context_id: Option<String>,
}

/// The inner document of the wrapper.
#[derive(Deserialize)]
struct Inner {
    #[serde(rename = "contextId")]
    context_id: String,
}

/// Returns the HAID text inside `value`: the value itself when bare, or the `contextId`
/// of a `HAWorkFlowContextID` wrapper (also accepted: an object with `contextId` directly).
pub fn unwrap(value: &str) -> Result<Cow<'_, str>, ContextIdError> {
    let trimmed = value.trim_start();
    if !trimmed.starts_with('{') {
        return Ok(Cow::Borrowed(value));
    }
    let outer: Wrapper =
        serde_json::from_str(trimmed).map_err(|e| ContextIdError::BadWrapper(e.to_string()))?;
    if let Some(inner) = outer.value {
        let inner: Inner = serde_json::from_str(&inner)
            .map_err(|e| ContextIdError::BadWrapper(format!("in `value`: {e}")))?;
        return Ok(Cow::Owned(inner.context_id));
    }
    outer
        .context_id
        .map(Cow::Owned)
        .ok_or_else(|| ContextIdError::BadWrapper("no `value` or `contextId` field".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_wins_over_header() {
        let v = find(Some("a=1&contextID=8-8--x"), "contextID", Some(b"other")).unwrap();
        assert_eq!(v.as_deref(), Some("8-8--x"));
        let v = find(Some("a=1"), "contextID", Some(b"hdr")).unwrap();
        assert_eq!(v.as_deref(), Some("hdr"));
        assert_eq!(find(None, "contextID", None).unwrap(), None);
        // blank values are absent
        let v = find(Some("contextID=&x=1"), "contextID", Some(b"hdr")).unwrap();
        assert_eq!(v.as_deref(), Some("hdr"));
        assert_eq!(
            find(Some("contextID=%20"), "contextID", Some(b" ")).unwrap(),
            None
        );
    }

    #[test]
    fn query_is_percent_decoded_and_plus_is_kept() {
        let v = find(Some("contextID=1-1--a%2Bb+7"), "contextID", None).unwrap();
        assert_eq!(v.as_deref(), Some("1-1--a+b+7"));
        assert_eq!(
            find(Some("contextID=%FF"), "contextID", None),
            Err(ContextIdError::NotUtf8)
        );
        assert_eq!(
            find(None, "contextID", Some(&[0xff, 0xfe])),
            Err(ContextIdError::NotUtf8)
        );
    }

    #[test]
    fn unwraps_gson_and_rejects_other_json() {
        let wrapped = r#"{"type":"HAWorkFlowContextID","value":"{\"contextId\":\"8-8--cs_1_devcs_2_dev1\"}"}"#;
        assert_eq!(unwrap(wrapped).unwrap(), "8-8--cs_1_devcs_2_dev1");
        assert_eq!(unwrap("8-8--x").unwrap(), "8-8--x");
        assert!(matches!(unwrap("{"), Err(ContextIdError::BadWrapper(_))));
        assert!(matches!(
            unwrap(r#"{"type":"x"}"#),
            Err(ContextIdError::BadWrapper(_))
        ));
        assert!(matches!(
            unwrap(r#"{"value":"not json"}"#),
            Err(ContextIdError::BadWrapper(_))
        ));
    }
}
