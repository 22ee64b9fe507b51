//! Bounds on what callers hold open on a replica: `min_revision` waits and `Watch` streams.
//! Each kind has a bound for the whole replica and a lower one per token, so one token (or one
//! runaway client of it) cannot take every slot from the others. Past either bound a call is
//! refused at once with RESOURCE_EXHAUSTED naming the bound; nothing queues.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flagstream::validate::shown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// One kind of hold (revision waits, say) and who holds how many.
#[derive(Debug)]
pub struct Holds {
    /// What is held, for refusals and metrics: "min_revision waits", "Watch streams".
    what: &'static str,
    /// The bound for the whole replica.
    total: usize,
    /// The bound per token.
    per_token: usize,
    held: Mutex<Held>,
    /// Exported: holds taken now.
    gauge: Gauge,
    /// Exported: holds refused.
    refused: Counter,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    /// Holds per token name; a token with none has no entry, so the map is as large as the
    /// number of tokens holding something.
    by_token: HashMap<Arc<str>, usize>,
}

/// A hold taken from [`Holds::take`]; given back when dropped.
#[derive(Debug)]
pub struct Hold {
    holds: Arc<Holds>,
    token: Arc<str>,
}

/// Why a hold was refused: which bound is reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The replica holds its bound of this kind.
    #[error("this replica holds its limit of {limit} {what}; retry later or on another replica")]
    Replica { what: &'static str, limit: usize },
    /// The token holds its bound of this kind.
    #[error(
        "token {} holds its limit of {limit} {what} on this replica",
        shown(token)
    )]
    Token {
        what: &'static str,
        token: String,
        limit: usize,
    },
}

impl Holds {
    /// Bounds for `what`: `total` on the replica, `per_token` for each token; `gauge` follows the
    /// holds taken, `refused` counts refusals.
    pub fn new(
        what: &'static str,
        total: usize,
        per_token: usize,
        gauge: Gauge,
        refused: Counter,
    ) -> Arc<Holds> {
        Arc::new(Holds {
            what,
            total,
            per_token: per_token.min(total),
            held: Mutex::default(),
            gauge,
            refused,
        })
    }

    /// A hold for `token`, or the bound that refuses it.
    pub fn take(self: &Arc<Self>, token: &str) -> Result<Hold, Refused> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.total >= self.total {
            self.refused.inc();
            return Err(Refused::Replica {
                what: self.what,
                limit: self.total,
            });
        }
        let (token, count) = match held.by_token.get_key_value(token) {
            Some((name, count)) => (name.clone(), *count),
            None => (Arc::from(token), 0),
        };
        if count >= self.per_token {
            self.refused.inc();
            return Err(Refused::Token {
                what: self.what,
                token: token.to_string(),
                limit: self.per_token,
            });
        }
        held.total += 1;
        held.by_token.insert(token.clone(), count + 1);
        self.gauge.inc();
        Ok(Hold {
            holds: self.clone(),
            token,
        })
    }

    /// Holds taken and not given back.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = self.holds.held.lock().unwrap_or_else(|e| e.into_inner());
        held.total -= 1;
        self.holds.gauge.dec();
        if let Some(count) = held.by_token.get_mut(&self.token) {
            *count -= 1;
            if *count == 0 {
                held.by_token.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold_per_token_and_in_total_and_are_given_back() {
        let (gauge, refused) = (Gauge::default(), Counter::default());
        let holds = Holds::new("waits", 3, 2, gauge.clone(), refused.clone());
        let a1 = holds.take("a").unwrap();
        let _a2 = holds.take("a").unwrap();
        assert_eq!(
            holds.take("a").unwrap_err(),
            Refused::Token {
                what: "waits",
                token: "a".into(),
                limit: 2
            }
        );
        let _b1 = holds.take("b").unwrap();
        assert_eq!(
            holds.take("c").unwrap_err(),
            Refused::Replica {
                what: "waits",
                limit: 3
            }
        );
        drop(a1);
        assert_eq!(holds.held(), 2);
        let _c1 = holds.take("c").unwrap();
        assert!(holds.take("a").is_err(), "the replica is full again");
        assert_eq!((gauge.get(), refused.get()), (3, 3));
    }

    #[test]
    fn tokens_without_holds_leave_no_entry() {
        let holds = Holds::new("streams", 10, 10, Gauge::default(), Counter::default());
        for i in 0..100 {
            drop(holds.take(&format!("token-{i}")).unwrap());
        }
        assert!(holds.held.lock().unwrap().by_token.is_empty());
    }
}
