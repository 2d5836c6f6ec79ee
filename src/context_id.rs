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
    /// The request carries context ids that name different HAIDs.
    #[error("the request carries different context ids ({first:?} and {second:?}); send one")]
    Ambiguous {
        /// The first value seen (query parameters before headers).
        first: String,
        /// The first value that disagrees with it.
        second: String,
    },
}

/// Finds the raw context id value: query parameter `query_name` in `query` (the part of the
/// URI after `?`), else the header values. Query values are percent-decoded; `+` stays `+`
/// (HAIDs carry Base64 aliases, and Linkis clients send `%2B` when they mean it).
/// A blank value counts as absent, as Linkis treats a blank context id as no context id.
///
/// Every value is looked at, not just the first: when the request carries several (query
/// parameters, headers, or both) they must name the same HAID, bare or wrapped, else the
/// answer is `Ambiguous`. Routing by one value while the context server acts on another
/// would route a HAID that was never checked. Identical duplicates count as one.
pub fn find<'a>(
    query: Option<&'a str>,
    query_name: &str,
    headers: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<Cow<'a, str>>, ContextIdError> {
    let mut found: Option<Cow<'a, str>> = None;
    let mut add = |v: Cow<'a, str>| -> Result<(), ContextIdError> {
        if v.trim().is_empty() {
            return Ok(());
        }
        match &found {
            None => found = Some(v),
            Some(first) if *first == v => {}
            Some(first) => {
                if unwrap(first)? != unwrap(&v)? {
                    return Err(ContextIdError::Ambiguous {
                        first: first.to_string(),
                        second: v.into_owned(),
                    });
                }
            }
        }
        Ok(())
    };
    if let Some(q) = query {
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == query_name {
                let v = percent_decode_str(v)
                    .decode_utf8()
                    .map_err(|_| ContextIdError::NotUtf8)?;
                add(v)?;
            }
        }
    }
    for bytes in headers {
        let v = std::str::from_utf8(bytes).map_err(|_| ContextIdError::NotUtf8)?;
        add(Cow::Borrowed(v))?;
    }
    Ok(found)
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
    fn several_values_must_name_one_haid() {
        let h = |v: &'static str| v.as_bytes();
        // identical duplicates are one value
        let v = find(
            Some("contextID=1-1--ab7&contextID=1-1--ab7"),
            "contextID",
            [h("1-1--ab7")],
        );
        assert_eq!(v.unwrap().as_deref(), Some("1-1--ab7"));
        // the same HAID bare and wrapped is one HAID
        let wrapped = r#"{"type":"HAWorkFlowContextID","value":"{\"contextId\":\"1-1--ab7\"}"}"#;
        assert!(find(Some("contextID=1-1--ab7"), "contextID", [h(wrapped)]).is_ok());
        // two headers that differ, two query values that differ, query against header
        for (q, hs) in [
            (None, vec![h("1-1--ab7"), h("1-1--ba7")]),
            (Some("contextID=1-1--ab7&contextID=1-1--ab8"), vec![]),
            (Some("contextID=1-1--ab7"), vec![h("1-1--xy7")]),
        ] {
            assert!(
                matches!(
                    find(q, "contextID", hs),
                    Err(ContextIdError::Ambiguous { .. })
                ),
                "{q:?}"
            );
        }
        // a blank duplicate is no value
        assert!(find(Some("contextID=1-1--ab7"), "contextID", [h(" ")]).is_ok());
    }

    #[test]
    fn query_wins_over_header() {
        let v = find(
            Some("a=1&contextID=8-8--x"),
            "contextID",
            [b"8-8--x".as_slice()],
        )
        .unwrap();
        assert_eq!(v.as_deref(), Some("8-8--x"));
        let v = find(Some("a=1"), "contextID", [b"hdr".as_slice()]).unwrap();
        assert_eq!(v.as_deref(), Some("hdr"));
        assert_eq!(find(None, "contextID", []).unwrap(), None);
        // blank values are absent
        let v = find(Some("contextID=&x=1"), "contextID", [b"hdr".as_slice()]).unwrap();
        assert_eq!(v.as_deref(), Some("hdr"));
        assert_eq!(
            find(Some("contextID=%20"), "contextID", [b" ".as_slice()]).unwrap(),
            None
        );
    }

    #[test]
    fn query_is_percent_decoded_and_plus_is_kept() {
        let v = find(Some("contextID=1-1--a%2Bb+7"), "contextID", []).unwrap();
        assert_eq!(v.as_deref(), Some("1-1--a+b+7"));
        assert_eq!(
            find(Some("contextID=%FF"), "contextID", []),
            Err(ContextIdError::NotUtf8)
        );
        assert_eq!(
            find(None, "contextID", [[0xffu8, 0xfe].as_slice()]),
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
