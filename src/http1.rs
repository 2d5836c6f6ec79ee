//! HTTP/1.1 message framing (RFC 9112, section 6), shared by hagate's forwarding loop and
//! its health checks: how a response body ends, and whether the connection can carry
//! another request after it. Pure: no IO.

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// It has none.
    Empty,
    /// After this many bytes.
    Length(u64),
    /// With the last chunk (and trailers).
    Chunked,
    /// When the server closes the connection.
    Close,
}

/// What a response head says of its body and its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Framed {
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The connection may carry another request after this response.
    pub(crate) reusable: bool,
}

/// A `Content-Length` value: decimal digits only, at most 19 of them.
pub(crate) fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Connection options that name no header to drop: `close` and `keep-alive` say what
/// becomes of the connection (a `Keep-Alive` header is dropped as hop-by-hop anyway), and
/// the names that frame or route the message are never dropped, so that what goes on is
/// still framed as the proxy read it (`Content-Length`, `Transfer-Encoding`) and still
/// carries its upgrade (`Upgrade`). Only answers are stripped with it: a request that names
/// any header goes to pingora's proxy, which has its own rules (and refuses `Host`).
const NOT_NOMINATED: [&[u8]; 6] = [
    b"close",
    b"keep-alive",
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"upgrade",
];

/// The header names that one `Connection` value nominates as hop-by-hop (RFC 9110, section
/// 7.6.1): a proxy removes them before it forwards the message. Its options, less those in
/// `NOT_NOMINATED`.
pub(crate) fn nominated(connection: &[u8]) -> impl Iterator<Item = &[u8]> {
    connection
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !NOT_NOMINATED.iter().any(|n| t.eq_ignore_ascii_case(n)))
}

/// Whether header `name` is nominated by one of the `Connection` values `connections`.
pub(crate) fn is_nominated<'a>(
    name: &[u8],
    connections: impl IntoIterator<Item = &'a [u8]>,
) -> bool {
    connections
        .into_iter()
        .any(|v| nominated(v).any(|t| t.eq_ignore_ascii_case(name)))
}

/// The framing of the final response whose head `resp` is, to a request by HEAD or not.
/// An interim (1xx) or invalid status, and conflicting or malformed lengths, are errors
/// (named as pingora names them).
pub(crate) fn response_framing(
    resp: &httparse::Response<'_, '_>,
    head_request: bool,
) -> Result<Framed, &'static str> {
    let status = resp.code.unwrap_or(0);
    if !(200..600).contains(&status) {
        return Err("InvalidHTTPHeader");
    }
    let mut reusable = resp.version == Some(1);
    let (mut length, mut chunked, mut coded) = (None, false, false);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = digits(h.value).ok_or("InvalidHTTPHeader")?;
            if length.is_some_and(|l| l != n) {
                return Err("InvalidHTTPHeader");
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            coded = true;
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection")
            && h.value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            reusable = false;
        }
    }
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if coded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    Ok(Framed {
        status,
        framing,
        reusable: reusable && framing != Framing::Close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_header_nominates_the_names_it_lists_but_not_those_that_frame_the_message() {
        let names = |v: &str| {
            nominated(v.as_bytes())
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("keep-alive, X-Drop ,,te"), ["X-Drop", "te"]);
        assert!(names("close").is_empty());
        assert!(names("Upgrade, Content-Length, transfer-encoding, HOST, Keep-Alive").is_empty());
        let connections = [&b"close"[..], b"x-a, x-b"];
        assert!(is_nominated(b"X-B", connections));
        assert!(!is_nominated(b"x-c", connections));
        assert!(!is_nominated(b"close", connections));
    }
}
