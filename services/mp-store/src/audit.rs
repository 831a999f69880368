//! The audit trail (`P:audit`, a stream never trimmed): every mark, decision, commit, new
//! version, rollback, round-end request and token change, written in the same atomic step
//! as the change itself (inside the Lua scripts, or in the same MULTI).

use super::*;

/// One audit record: what happened, who did it (an expert's id, or `trainer` / `system` /
/// `operator`), when, and its fields (image, proposal, mark, decision, version_before,
/// version_after, accuracy_before, accuracy_after, reason, expert, name, role — as the kind
/// has them).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditRecord {
    pub id: String,
    pub kind: String,
    pub who: String,
    pub time_ms: u64,
    pub fields: std::collections::BTreeMap<String, String>,
}

/// Which records an audit query wants (every set condition must hold).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// The record's `who`, or its `expert` field (the expert a decision or token change was
    /// about).
    pub expert: Option<String>,
    pub image: Option<String>,
    /// `version_before` or `version_after`.
    pub version: Option<u64>,
    /// At most this many, the newest (0: all).
    pub limit: usize,
}

impl AuditFilter {
    /// The records of `all` (oldest first) this filter accepts: the newest `limit` of them.
    pub fn apply(&self, all: &[AuditRecord]) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = all.iter().filter(|r| self.accepts(r)).cloned().collect();
        if self.limit > 0 && out.len() > self.limit {
            out.drain(..out.len() - self.limit);
        }
        out
    }

    fn accepts(&self, r: &AuditRecord) -> bool {
        let f = |k: &str| r.fields.get(k).map(String::as_str);
        self.expert
            .as_deref()
            .is_none_or(|e| r.who == e || f("expert") == Some(e))
            && self.image.as_deref().is_none_or(|i| f("image") == Some(i))
            && self.version.is_none_or(|v| {
                let v = v.to_string();
                f("version_before") == Some(&v) || f("version_after") == Some(&v)
            })
    }
}

impl Store {
    /// Adds the XADD of an audit record to `pipe` (the caller's atomic pipeline).
    pub(crate) fn audit_in(
        &self,
        pipe: &mut redis::Pipeline,
        kind: &str,
        who: &str,
        fields: &[(&str, &str)],
    ) {
        let mut items: Vec<(&str, String)> = vec![
            ("kind", kind.to_string()),
            ("who", who.to_string()),
            ("time_ms", now_ms().to_string()),
        ];
        items.extend(fields.iter().map(|(k, v)| (*k, v.to_string())));
        pipe.xadd(self.k("audit"), "*", &items).ignore();
    }

    /// The audit records `filter` accepts, oldest first (the newest `limit` of them).
    pub async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        Ok(filter.apply(&self.audit_all().await?))
    }

    /// Every audit record, oldest first.
    pub async fn audit_all(&self) -> Result<Vec<AuditRecord>> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        let mut start = "-".to_string();
        loop {
            let reply: redis::streams::StreamRangeReply =
                c.xrange_count(self.k("audit"), &start, "+", 1000).await?;
            let n = reply.ids.len();
            for e in reply.ids {
                start = format!("({}", e.id);
                let mut fields = std::collections::BTreeMap::new();
                for (k, v) in &e.map {
                    fields.insert(k.clone(), value_string(v));
                }
                let take = |k: &str, f: &mut std::collections::BTreeMap<String, String>| {
                    f.remove(k).unwrap_or_default()
                };
                let r = AuditRecord {
                    kind: take("kind", &mut fields),
                    who: take("who", &mut fields),
                    time_ms: take("time_ms", &mut fields).parse().unwrap_or(0),
                    id: e.id,
                    fields,
                };
                out.push(r);
            }
            if n < 1000 {
                break;
            }
        }
        Ok(out)
    }
}
