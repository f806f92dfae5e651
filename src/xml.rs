//! A reader of FHIR XML Bundles' tags, enough to find the `value`s of a few elements without
//! a parser: for the proxy's rewriting of an answer's links and the SMART layer's check of a
//! batch's entry URLs.

use std::ops::Range;

/// What [`bundle_values`] found: the byte ranges (inside the quotes) of the Bundle's `type`
/// `value` and of the wanted elements' `value` attributes, in order.
pub(crate) struct BundleValues {
    // (Read by the proxy's rewriting alone.)
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) kind: Option<Range<usize>>,
    pub(crate) values: Vec<Range<usize>>,
}

/// The `value` attributes of the elements at `wanted` (each a path from the root, the
/// element's name last: `[b"Bundle", b"entry", b"fullUrl"]`) in a FHIR XML Bundle, and its
/// `type`'s; `None` when the body is not one whole XML document whose root is `Bundle`, or
/// holds what this reader does not take: a `DOCTYPE` (whose entities it would not expand), an
/// element with a namespace prefix or a `value` attribute in a namespace (a parser reading
/// local names, as HAPI's does, takes `f:url` for `url`), a `value` twice, a tag it cannot
/// read. A scan of the tags only: text, comments, CDATA sections and processing instructions
/// are skipped.
pub(crate) fn bundle_values(body: &[u8], wanted: &[&[&[u8]]]) -> Option<BundleValues> {
    let mut open: Vec<&[u8]> = Vec::new();
    let mut values = Vec::new();
    let (mut rooted, mut kind) = (false, None);
    let mut at = 0;
    while let Some(lt) = memchr::memchr(b'<', &body[at..]).map(|found| at + found) {
        let rest = &body[lt..];
        if let Some(after) = [
            (&b"<!--"[..], &b"-->"[..]),
            (b"<![CDATA[", b"]]>"),
            (b"<?", b"?>"),
        ]
        .iter()
        .find(|(start, _)| rest.starts_with(start))
        .map(|(start, end)| {
            memchr::memmem::find(&rest[start.len()..], end)
                .map(|e| lt + start.len() + e + end.len())
        }) {
            at = after?;
            continue;
        }
        if rest.starts_with(b"<!") || (rooted && open.is_empty()) {
            // A DOCTYPE, or a second root.
            return None;
        }
        if let Some(name) = rest.strip_prefix(b"</") {
            let end = memchr::memchr(b'>', name)?;
            if open.pop()? != name[..end].trim_ascii() {
                return None;
            }
            at = lt + 2 + end + 1;
            continue;
        }
        // A start tag: its name, its attributes (values in either quote), `>` or `/>`.
        let mut i = lt + 1;
        let name_end = i + body[i..]
            .iter()
            .position(|b| b.is_ascii_whitespace() || matches!(b, b'>' | b'/'))?;
        let name = &body[i..name_end];
        i = name_end;
        let mut value = None;
        let empty = loop {
            while body.get(i)?.is_ascii_whitespace() {
                i += 1;
            }
            match body.get(i)? {
                b'>' => break false,
                b'/' if body.get(i + 1) == Some(&b'>') => {
                    i += 1;
                    break true;
                }
                _ => {
                    let eq = i + memchr::memchr(b'=', &body[i..])?;
                    let attribute = body[i..eq].trim_ascii();
                    let mut start = eq + 1;
                    while body.get(start)?.is_ascii_whitespace() {
                        start += 1;
                    }
                    let quote = *body.get(start)?;
                    if quote != b'"' && quote != b'\'' {
                        return None;
                    }
                    let end = start + 1 + memchr::memchr(quote, &body[start + 1..])?;
                    if attribute == b"value" {
                        // Twice is no XML; a parser that takes it keeps one or the other.
                        if value.is_some() {
                            return None;
                        }
                        value = Some(start + 1..end);
                    } else if attribute.ends_with(b":value") {
                        // A `value` in a namespace (`x:value`), which a parser reading local
                        // names takes for the value: not read here.
                        return None;
                    }
                    i = end + 1;
                }
            }
        };
        // A prefixed element (`f:url`) is, to a parser reading local names, the element
        // without it: not read here.
        if name.is_empty() || name.contains(&b':') || (!rooted && name != b"Bundle") {
            return None;
        }
        rooted = true;
        if open.as_slice() == [b"Bundle"] && name == b"type" {
            kind = value.clone();
        }
        if wanted.iter().any(|path| {
            path.split_last()
                .is_some_and(|(last, above)| *last == name && above == open.as_slice())
        }) {
            values.extend(value);
        }
        if !empty {
            open.push(name);
        }
        at = i + 1;
    }
    (rooted && open.is_empty()).then_some(BundleValues { kind, values })
}

/// An XML attribute value's text: its five named entities and character references
/// decoded; `None` for another entity (a `DOCTYPE`'s, which there is none of), a raw `<`, or
/// bytes that are no UTF-8.
pub(crate) fn unescape(raw: &[u8]) -> Option<String> {
    let raw = std::str::from_utf8(raw).ok()?;
    if raw.contains('<') {
        return None;
    }
    if !raw.contains('&') {
        return Some(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semi = rest[amp..].find(';')? + amp;
        let entity = &rest[amp + 1..semi];
        let c = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let (digits, radix) = match entity.strip_prefix("#x").or(entity.strip_prefix("#X"))
                {
                    Some(hex) => (hex, 16),
                    None => (entity.strip_prefix('#')?, 10),
                };
                if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
                    return None;
                }
                char::from_u32(u32::from_str_radix(digits, radix).ok()?).filter(|c| *c != '\0')?
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Some(out)
}
