//! Removing Encrypted Client Hello configurations from DNS answers.
//!
//! Sluice classifies TLS by the SNI in the ClientHello. A client that finds
//! an `ech` SvcParam (key 5, RFC 9460 §7 / ECH draft) in an HTTPS (type 65) or
//! SVCB (type 64) record encrypts its real SNI, leaving only the provider's
//! outer name visible. Stripping the parameter from answers — before they are
//! cached, so cached copies are stripped too — keeps the SNI observable while
//! leaving the rest of the record (ALPN, hints, port) intact.
//!
//! If `ech` was listed in the record's `mandatory` parameter it is removed
//! from that list too: a record whose mandatory list names an absent key must
//! be ignored by clients (RFC 9460 §8), which would lose the whole record.
//! Note that stripping invalidates any RRSIG over the set; a validating stub
//! will treat it as bogus, which is the policy's intent when it is enabled.

use hickory_proto::rr::rdata::svcb::{SVCB, SvcParamKey, SvcParamValue};
use hickory_proto::rr::{RData, Record};

/// Strips `ech` from every HTTPS/SVCB record; returns whether any was removed.
pub fn strip_ech(records: &mut [Record]) -> bool {
    let mut stripped = false;
    for record in records {
        match &mut record.data {
            RData::HTTPS(https) => stripped |= strip_svcb(&mut https.0),
            RData::SVCB(svcb) => stripped |= strip_svcb(svcb),
            _ => {}
        }
    }
    stripped
}

fn strip_svcb(svcb: &mut SVCB) -> bool {
    let before = svcb.svc_params.len();
    svcb.svc_params.retain(|(key, _)| *key != SvcParamKey::EchConfigList);
    if svcb.svc_params.len() == before {
        return false;
    }
    for (_, value) in &mut svcb.svc_params {
        if let SvcParamValue::Mandatory(mandatory) = value {
            mandatory.0.retain(|k| *k != SvcParamKey::EchConfigList);
        }
    }
    svcb.svc_params
        .retain(|(_, value)| !matches!(value, SvcParamValue::Mandatory(m) if m.0.is_empty()));
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod tests {
    use std::str::FromStr;

    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::HTTPS;
    use hickory_proto::rr::rdata::svcb::{Alpn, EchConfigList, Mandatory};

    use super::*;

    #[test]
    fn strips_ech_and_its_mandatory_mention_only() {
        let svcb = SVCB::new(
            1,
            Name::root(),
            vec![
                (
                    SvcParamKey::Mandatory,
                    SvcParamValue::Mandatory(Mandatory(vec![SvcParamKey::EchConfigList])),
                ),
                (SvcParamKey::Alpn, SvcParamValue::Alpn(Alpn(vec!["h2".into()]))),
                (
                    SvcParamKey::EchConfigList,
                    SvcParamValue::EchConfigList(EchConfigList(vec![1, 2, 3])),
                ),
            ],
        );
        let mut records = vec![Record::from_rdata(
            Name::from_str("a.test.").unwrap(),
            60,
            RData::HTTPS(HTTPS(svcb)),
        )];
        assert!(strip_ech(&mut records));
        let RData::HTTPS(https) = &records[0].data else {
            panic!("not HTTPS")
        };
        assert_eq!(https.0.svc_params.len(), 1);
        assert_eq!(https.0.svc_params[0].0, SvcParamKey::Alpn);
        assert!(!strip_ech(&mut records));
    }
}
