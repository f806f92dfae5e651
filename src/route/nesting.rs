//! Upstream bases of different tenants, one under the other on the same server.

use std::collections::HashMap;
use std::fmt;

use super::upstream::{TenantRecord, UpstreamBase};
use crate::tenant::TenantId;

/// One tenant's upstream base lies under another tenant's on the same server
/// (`http://hapi/fhir` and `http://hapi/fhir/tenant-b`).
///
/// The proxy puts a client's path under its tenant's base, so the outer tenant's tokens would
/// reach the inner tenant's data (`/tenant-b/Patient/1`). [`nested_bases`] finds such pairs;
/// the gateway binary refuses them in its configuration and in the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedBases {
    /// The tenant whose base holds the other's.
    pub outer_tenant: TenantId,
    /// Its base.
    pub outer: UpstreamBase,
    /// The tenant whose base lies under it.
    pub inner_tenant: TenantId,
    /// Its base.
    pub inner: UpstreamBase,
}

impl fmt::Display for NestedBases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tenant {}'s upstream {} lies under tenant {}'s upstream {} on the same server: the \
             second tenant's tokens could reach the first's data through the path; give each \
             tenant a base of its own beside the others' (/fhir/tenant-a, /fhir/tenant-b)",
            self.inner_tenant, self.inner, self.outer_tenant, self.outer
        )
    }
}

/// Host, port and path.
type Place = (String, u16, String);

/// A base as the server it reaches reads it: the host (lower-cased, without a trailing dot;
/// an IP address in its canonical form), the port (the scheme's default when none is written)
/// and the path as most servers resolve it: percent-escapes decoded, `;` parameters dropped,
/// runs of slashes merged, `.` and `..` segments resolved, lower-cased (some servers ignore
/// case); and as Windows servers (IIS) also do: a backslash is a slash, a NUL ends the path,
/// and a segment's trailing dots and spaces are not part of it.
fn server_and_path(base: &UpstreamBase) -> Place {
    let authority = base.authority();
    let port = authority
        .port_u16()
        .unwrap_or(match base.scheme().as_str() {
            "https" => 443,
            _ => 80,
        });
    let host = canonical_host(authority.host());
    let decoded = percent_encoding::percent_decode_str(base.path()).decode_utf8_lossy();
    let decoded = decoded.split('\0').next().unwrap_or("");
    let mut segments: Vec<String> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        let segment = segment.split(';').next().unwrap_or("");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => match segment.trim_end_matches(['.', ' ']) {
                "" => {}
                segment => segments.push(segment.to_lowercase()),
            },
        }
    }
    let path = segments.iter().fold(String::new(), |mut path, segment| {
        path.push('/');
        path.push_str(segment);
        path
    });
    (host, port, path)
}

/// A host as the resolver reads it, so that two spellings of one server compare equal:
/// - IPv4 in any form `inet_aton` takes (`127.1`, `0x7f000001`, `2130706433`, `0177.0.0.1`),
///   and IPv4 mapped into IPv6, as its dotted quad; an IPv6 address without its zone (`%1`);
/// - every loopback address (`127.0.0.0/8`, `::1`), the unspecified ones (`0.0.0.0`, `::`, which
///   reach this host) and `localhost` or a name under it, as `localhost`: one host, whichever
///   address a server there listens on;
/// - other names lower-cased, without a trailing dot.
///
/// A name and an address of one server still differ (`ehr.example` and `10.0.0.5`): that
/// would take resolving the name, which may change.
fn canonical_host(host: &str) -> String {
    match host_address(host) {
        Some(ip) if ip.is_loopback() || ip.is_unspecified() => "localhost".to_owned(),
        Some(ip) => ip.to_string(),
        None => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let name = bare.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost" || name.ends_with(".localhost") {
                "localhost".to_owned()
            } else {
                name
            }
        }
    }
}

/// The IP address a URL's host (as [`http::uri::Authority::host`] gives it, IPv6 in brackets)
/// names, as the system's resolver reads it: IPv4 in any form `inet_aton` takes (`127.1`,
/// `0x7f000001`, `2130706433`, `0177.0.0.1`), IPv4 mapped into IPv6 as IPv4, an IPv6 address
/// without its zone (`%1`). `None` for a name (not looked up).
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr};
/// use tower_fhir::route::host_address;
///
/// let loopback = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
/// for host in ["127.0.0.1", "127.1", "0x7f000001", "2130706433", "[::ffff:127.0.0.1]"] {
///     assert_eq!(host_address(host), loopback, "{host}");
/// }
/// assert_eq!(host_address("ehr.example"), None);
/// ```
pub fn host_address(host: &str) -> Option<std::net::IpAddr> {
    use std::net::IpAddr;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    // An IPv6 zone (`[::1%1]`, which the resolver takes) names an interface, not another host.
    let bare = match bare.split_once('%') {
        Some((address, _zone)) if address.contains(':') => address,
        _ => bare,
    };
    bare.parse::<IpAddr>()
        .ok()
        .or_else(|| inet_aton(bare).map(IpAddr::V4))
        .map(|ip| ip.to_canonical())
}

/// An IPv4 address in the forms `inet_aton` (and so the system's resolver) accepts: one to
/// four parts, each decimal, `0x` hexadecimal or `0` octal, the last filling the bytes left.
fn inet_aton(text: &str) -> Option<std::net::Ipv4Addr> {
    let text = text.strip_suffix('.').unwrap_or(text);
    let parts: Vec<&str> = text.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) =
            if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
                (hex, 16)
            } else if part.len() > 1 && part.starts_with('0') {
                (&part[1..], 8)
            } else {
                (*part, 10)
            };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let value = if digits.is_empty() {
            0
        } else {
            u32::from_str_radix(digits, radix).ok()?
        };
        values.push(value);
    }
    let (last, leading) = values.split_last()?;
    if leading.iter().any(|&byte| byte > 0xff) {
        return None;
    }
    let room = 8 * (4 - leading.len() as u32);
    if room < 32 && *last >> room != 0 {
        return None;
    }
    let mut address = *last;
    for (index, byte) in leading.iter().enumerate() {
        address |= byte << (24 - 8 * index as u32);
    }
    Some(std::net::Ipv4Addr::from(address))
}

/// Every pair of tenants whose upstream bases lie one under the other on the same server
/// (same host and port, the host as the resolver reads it: `127.1`, `0x7f000001` and
/// `localhost` are `127.0.0.1`; paths compared by whole segments, ignoring case). A name and
/// an address of one server are not seen as one: give every tenant's upstream the same
/// spelling of its host. Bases that are
/// equal are not nested (the tenants then share one server's data by their own
/// configuration), nor are a tenant's own upstreams, nor in-process tenants.
///
/// Each base is checked against its own ancestors only, so the cost grows with the number of
/// bases times their depth, not with its square.
///
/// ```
/// use tower_fhir::route::{nested_bases, TenantRecord, Upstream};
/// use tower_fhir::tenant::TenantId;
/// use tower_fhir::version::FhirVersion;
///
/// let record = |url: &str| TenantRecord::new([Upstream::parse(url, FhirVersion::R4).unwrap()]).unwrap();
/// let a: TenantId = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".parse().unwrap();
/// let b: TenantId = "5e2a7d3f-9b4c-4d6e-8f80-2b3c4d5e6f70".parse().unwrap();
/// let (outer, inner) = (record("http://hapi:8080/fhir"), record("http://HAPI:8080/FHIR/tenant-b"));
/// let found = nested_bases([(a, &outer), (b, &inner)]);
/// assert_eq!(found.len(), 1);
/// assert_eq!((found[0].outer_tenant, found[0].inner_tenant), (a, b));
///
/// // Siblings, another server or the same base are not nested.
/// let sibling = record("http://hapi:8080/fhir-b");
/// let other_port = record("http://hapi:8081/fhir/tenant-b");
/// assert!(nested_bases([(a, &outer), (b, &sibling)]).is_empty());
/// assert!(nested_bases([(a, &outer), (b, &other_port)]).is_empty());
/// assert!(nested_bases([(a, &outer), (b, &outer)]).is_empty());
/// ```
pub fn nested_bases<'a>(
    tenants: impl IntoIterator<Item = (TenantId, &'a TenantRecord)>,
) -> Vec<NestedBases> {
    let bases: Vec<(TenantId, &UpstreamBase, Place)> = tenants
        .into_iter()
        .flat_map(|(tenant, record)| {
            record
                .upstreams()
                .iter()
                .map(move |upstream| (tenant, upstream.base()))
        })
        .map(|(tenant, base)| (tenant, base, server_and_path(base)))
        .collect();
    // Each base by its server and path, with every tenant (and the base as written) at it.
    type Key<'k> = (&'k str, u16, &'k str);
    let mut at: HashMap<Key<'_>, Vec<(TenantId, &UpstreamBase)>> = HashMap::new();
    for (tenant, base, (host, port, path)) in &bases {
        at.entry((host.as_str(), *port, path.as_str()))
            .or_default()
            .push((*tenant, *base));
    }
    let mut found = Vec::new();
    for (tenant, base, (host, port, path)) in &bases {
        // The proper ancestors of `/a/b/c`: `/a/b`, `/a`, and the root.
        let mut ancestor = path.as_str();
        while let Some(cut) = ancestor.rfind('/') {
            ancestor = &ancestor[..cut];
            let Some(outers) = at.get(&(host.as_str(), *port, ancestor)) else {
                continue;
            };
            for (outer_tenant, outer) in outers {
                let pair = NestedBases {
                    outer_tenant: *outer_tenant,
                    outer: (*outer).clone(),
                    inner_tenant: *tenant,
                    inner: (*base).clone(),
                };
                if outer_tenant != tenant && !found.contains(&pair) {
                    found.push(pair);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Upstream;
    use crate::version::FhirVersion;

    fn tenant(n: u8) -> TenantId {
        format!("00000000-0000-4000-8000-0000000000{n:02}")
            .parse()
            .unwrap()
    }

    fn record(urls: &[&str]) -> TenantRecord {
        TenantRecord::new(
            urls.iter()
                .map(|url| Upstream::parse(url, FhirVersion::R4).unwrap()),
        )
        .unwrap()
    }

    #[test]
    fn every_spelling_of_one_host_is_one_host() {
        for loopback in [
            "127.0.0.1",
            "127.0.0.1.",
            "127.1",
            "0x7f000001",
            "2130706433",
            "0177.0.0.1",
            "127.0.1",
            "0x7f.1",
            "127.2.3.4",
            "[::1]",
            "[::1%1]",
            "[::1%25lo]",
            "[::%2]",
            "[::ffff:127.0.0.1]",
            "0.0.0.0",
            "0",
            "[::]",
            "localhost",
            "LOCALHOST.",
            "api.localhost",
        ] {
            assert_eq!(canonical_host(loopback), "localhost", "{loopback}");
        }
        for (spelling, canonical) in [
            ("10.0.0.5", "10.0.0.5"),
            ("10.5", "10.0.0.5"),
            ("0xa000005", "10.0.0.5"),
            ("167772165", "10.0.0.5"),
            ("012.0.0.05", "10.0.0.5"),
            ("[::ffff:10.0.0.5]", "10.0.0.5"),
            ("[2001:DB8::1]", "2001:db8::1"),
            ("[fe80::1%eth0]", "fe80::1"),
            ("EHR.Example.", "ehr.example"),
            ("hapi", "hapi"),
            // Not addresses: names, as the resolver would take them.
            ("1.2.3.4.5", "1.2.3.4.5"),
            ("256.1.1.1", "256.1.1.1"),
            ("1.2.3.256", "1.2.3.256"),
            ("08.1.1.1", "08.1.1.1"),
            ("4294967296", "4294967296"),
        ] {
            assert_eq!(canonical_host(spelling), canonical, "{spelling}");
        }
    }

    #[test]
    fn a_base_nested_under_another_spelling_of_its_host_is_found() {
        for host in [
            "localhost",
            "127.1",
            "0x7f000001",
            "2130706433",
            "[::1]",
            "[::1%1]",
            "0.0.0.0",
        ] {
            let records = [
                (1, record(&["http://127.0.0.1:19001/fhir"])),
                (2, record(&[&format!("http://{host}:19001/fhir/tenant-b")])),
            ];
            assert_eq!(pairs(&records), [(tenant(1), tenant(2))], "{host}");
        }
        let records = [
            (1, record(&["http://10.0.0.5/fhir"])),
            (2, record(&["http://10.5:80/fhir/tenant-b"])),
        ];
        assert_eq!(pairs(&records), [(tenant(1), tenant(2))]);
    }

    fn pairs(records: &[(u8, TenantRecord)]) -> Vec<(TenantId, TenantId)> {
        nested_bases(records.iter().map(|(n, r)| (tenant(*n), r)))
            .into_iter()
            .map(|found| (found.outer_tenant, found.inner_tenant))
            .collect()
    }

    #[test]
    fn a_base_under_another_tenants_is_found_at_any_depth_and_either_order() {
        let records = [
            (2, record(&["http://hapi/fhir/a/b"])),
            (1, record(&["http://hapi/fhir"])),
        ];
        assert_eq!(pairs(&records), [(tenant(1), tenant(2))]);
        // The root holds every path; a default port is the same server.
        let records = [
            (1, record(&["http://hapi:80"])),
            (2, record(&["http://hapi/x"])),
            (3, record(&["https://hapi/x"])),
        ];
        assert_eq!(pairs(&records), [(tenant(1), tenant(2))]);
        // Case is ignored: some servers do.
        let records = [
            (1, record(&["http://Hapi/FHIR"])),
            (2, record(&["http://hapi/fhir/B"])),
        ];
        assert_eq!(pairs(&records), [(tenant(1), tenant(2))]);
        // Paths and hosts as the server reads them: escapes, `;` parameters, doubled slashes,
        // dot segments, IP address spellings, a trailing dot.
        for (outer, inner) in [
            ("http://hapi/%66hir", "http://hapi/fhir/b"),
            ("http://hapi/fhir;v=1", "http://hapi/fhir/b"),
            ("http://hapi/x/%2e%2e/fhir", "http://hapi/fhir/b"),
            ("http://hapi//fhir", "http://hapi/fhir/b"),
            ("http://hapi/fhir", "http://hapi/fhir//b"),
            ("http://[::1]:8080/fhir", "http://[0:0::1]:8080/fhir/b"),
            ("http://[::ffff:127.0.0.1]/fhir", "http://127.0.0.1/fhir/b"),
            ("http://hapi./fhir", "http://HAPI/fhir/b"),
            // As Windows servers read paths.
            ("http://hapi/fhir", "http://hapi/fhir%5Cb"),
            ("http://hapi/fhir%00x", "http://hapi/fhir/b"),
            ("http://hapi/fhir", "http://hapi/fhir./b"),
            ("http://hapi/fhir", "http://hapi/fhir%20/b"),
            ("http://hapi/fhir.", "http://hapi/fhir/b"),
        ] {
            let records = [(1, record(&[outer])), (2, record(&[inner]))];
            assert_eq!(pairs(&records), [(tenant(1), tenant(2))], "{outer} {inner}");
        }
        // Several tenants at one base are each named.
        let records = [
            (1, record(&["http://hapi/fhir"])),
            (2, record(&["http://hapi/fhir"])),
            (3, record(&["http://hapi/fhir/c"])),
        ];
        assert_eq!(
            pairs(&records),
            [(tenant(1), tenant(3)), (tenant(2), tenant(3))]
        );
    }

    #[test]
    fn siblings_prefixes_equal_bases_and_a_tenants_own_upstreams_are_not_nested() {
        let records = [
            (1, record(&["http://hapi/fhir", "http://hapi/fhir/stu3"])),
            (2, record(&["http://hapi/fhir-b"])),
            (3, record(&["http://hapi/fhir-b"])),
            (4, record(&["http://other/fhir/d"])),
            (5, record(&["http://hapi:8080/fhir/e"])),
        ];
        assert_eq!(pairs(&records), []);
        // But a tenant sharing another's base reaches the upstreams that tenant has under it.
        let records = [
            (1, record(&["http://hapi/fhir", "http://hapi/fhir/stu3"])),
            (2, record(&["http://hapi/fhir"])),
        ];
        assert_eq!(pairs(&records), [(tenant(2), tenant(1))]);
        let local = TenantRecord::in_process(
            crate::route::InProcessTenant::new("k", [FhirVersion::R4]).unwrap(),
        );
        assert!(
            nested_bases([(tenant(1), &record(&["http://hapi"])), (tenant(2), &local)]).is_empty()
        );
    }

    #[test]
    fn the_message_names_both_tenants_and_bases() {
        let (outer, inner) = (
            record(&["http://hapi/fhir"]),
            record(&["http://hapi/fhir/b"]),
        );
        let found = nested_bases([(tenant(1), &outer), (tenant(2), &inner)]);
        let text = found[0].to_string();
        for part in [
            "http://hapi/fhir/b",
            "http://hapi/fhir",
            &tenant(1).to_string(),
            &tenant(2).to_string(),
        ] {
            assert!(text.contains(part), "{text}");
        }
    }
}
