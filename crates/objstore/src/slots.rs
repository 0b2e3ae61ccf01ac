//! The GET slots: at most `max_in_flight` GETs at once over every object, handed out fairly
//! between tenants (round robin), demand before prefetch, and at most `per_tenant` to one
//! tenant.
//!
//! A plain FIFO semaphore let one tenant starve the others: a VM that touches a thousand
//! chunks queues a thousand fetches, and another tenant's single fault waited behind all of
//! them (at 16 GETs in flight and ~10 ms a GET, over half a second; behind a slow store, up to
//! the deadline). Here each tenant has its own queue per class; a freed slot goes to the
//! tenant with a demand fetch waiting that holds the fewest slots (the longest waiting among
//! equals), else likewise for prefetch, so a newcomer's demand GET starts as soon as one slot
//! frees, however long the others' queues.
//! The per-tenant cap keeps slots for others when a store hangs and every GET of a tenant
//! runs to the deadline.
//!
//! A chunk is fetched once however many sessions wait for it (single flight), possibly for
//! several tenants. Its [`Ticket`] is queued under each tenant that waits for it, and the first
//! queue to reach it hands it its slot (charged to that tenant); the other entries are then
//! stale and skipped. So a tenant never waits behind another's queue for a chunk both need.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Whom a fetch is for; slots are shared fairly between tenants (faultd: a session owner's uid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(pub u32);

/// Why a chunk is wanted: a fault waits for it, or it is fetched ahead of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A vCPU or a device waits for it.
    Demand,
    /// Fetched ahead (a recording's replay); served after every waiting demand fetch.
    Prefetch,
}

impl Class {
    const ALL: [Class; 2] = [Class::Demand, Class::Prefetch];

    fn index(self) -> usize {
        match self {
            Class::Demand => 0,
            Class::Prefetch => 1,
        }
    }
}

/// Who asks for a chunk, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requester {
    /// The tenant charged for the GET.
    pub tenant: Tenant,
    /// Demand or prefetch.
    pub class: Class,
}

impl Requester {
    /// A fault of `tenant` waits for the chunk.
    pub fn demand(tenant: Tenant) -> Requester {
        Requester {
            tenant,
            class: Class::Demand,
        }
    }
}

/// One fetch's claim to a slot; queued under every tenant that waits for the chunk and
/// handed a slot once, by the first queue that reaches it.
#[derive(Debug)]
pub(crate) struct Ticket {
    tx: Mutex<Option<oneshot::Sender<Slot>>>,
}

impl Ticket {
    /// A ticket and where its slot will arrive.
    pub(crate) fn new() -> (Arc<Ticket>, oneshot::Receiver<Slot>) {
        let (tx, rx) = oneshot::channel();
        (
            Arc::new(Ticket {
                tx: Mutex::new(Some(tx)),
            }),
            rx,
        )
    }

    /// Whether it still waits for a slot (not handed one, its fetch not given up).
    pub(crate) fn waiting(&self) -> bool {
        lock(&self.tx).as_ref().is_some_and(|tx| !tx.is_closed())
    }
}

#[derive(Debug)]
struct State {
    free: usize,
    per_tenant: usize,
    held: HashMap<Tenant, usize>,
    /// Per class, the tenants with tickets queued, in turn order.
    turns: [VecDeque<Tenant>; 2],
    queues: HashMap<(usize, Tenant), VecDeque<Arc<Ticket>>>,
}

/// The GET slots of a fetcher.
#[derive(Debug, Clone)]
pub(crate) struct FairSlots {
    state: Arc<Mutex<State>>,
}

/// A GET slot, held while one GET runs; dropping it hands it to the next in turn.
#[derive(Debug)]
pub(crate) struct Slot {
    state: Arc<Mutex<State>>,
    tenant: Tenant,
    armed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let state = self.state.clone();
        let mut st = lock(&state);
        st.free += 1;
        st.release(self.tenant);
        dispatch(&state, &mut st);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding it; a poisoned lock still holds consistent counts.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn release(&mut self, tenant: Tenant) {
        if let Some(n) = self.held.get_mut(&tenant) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&tenant);
            }
        }
    }

    /// The next (class, tenant) in turn that may take a slot, removed from or rotated in its
    /// turn order.
    fn next_turn(&mut self) -> Option<(usize, Tenant)> {
        for class in Class::ALL.map(Class::index) {
            let per_tenant = self.per_tenant;
            let held = &self.held;
            let turns = &mut self.turns[class];
            // The tenant holding the fewest slots, the longest waiting among equals: a
            // tenant with GETs running never goes before one with none.
            let Some((i, _)) = turns
                .iter()
                .map(|t| held.get(t).copied().unwrap_or(0))
                .enumerate()
                .filter(|&(_, n)| n < per_tenant)
                .min_by_key(|&(i, n)| (n, i))
            else {
                continue;
            };
            let tenant = turns.remove(i).expect("position is in range");
            return Some((class, tenant));
        }
        None
    }
}

/// Hands free slots to waiting tickets, in turn.
fn dispatch(state: &Arc<Mutex<State>>, st: &mut State) {
    while st.free > 0 {
        let Some((class, tenant)) = st.next_turn() else {
            return;
        };
        let queue = st.queues.entry((class, tenant)).or_default();
        let ticket = queue.pop_front();
        if queue.is_empty() {
            st.queues.remove(&(class, tenant));
        } else {
            // Its turn is used: to the back of the order.
            st.turns[class].push_back(tenant);
        }
        let Some(tx) = ticket.and_then(|t| lock(&t.tx).take()) else {
            continue; // handed a slot through another tenant's queue already
        };
        st.free -= 1;
        *st.held.entry(tenant).or_default() += 1;
        let slot = Slot {
            state: state.clone(),
            tenant,
            armed: true,
        };
        if let Err(mut slot) = tx.send(slot) {
            // Its fetch gave up waiting: the slot was never taken.
            slot.armed = false;
            st.free += 1;
            st.release(tenant);
        }
    }
}

impl FairSlots {
    /// `max_in_flight` slots, at most `per_tenant` (at least 1) held by one tenant.
    pub(crate) fn new(max_in_flight: usize, per_tenant: usize) -> FairSlots {
        FairSlots {
            state: Arc::new(Mutex::new(State {
                free: max_in_flight.max(1),
                per_tenant: per_tenant.max(1),
                held: HashMap::new(),
                turns: [VecDeque::new(), VecDeque::new()],
                queues: HashMap::new(),
            })),
        }
    }

    /// Queues `ticket` for `who`; its slot arrives on the ticket's receiver when it is `who`'s
    /// turn (or another queue's that holds it). Queuing a ticket that holds a slot already,
    /// or twice for one tenant and class, costs one stale entry and nothing else.
    pub(crate) fn enqueue(&self, ticket: &Arc<Ticket>, who: Requester) {
        let mut st = lock(&self.state);
        let class = who.class.index();
        if !st.queues.contains_key(&(class, who.tenant)) {
            st.turns[class].push_back(who.tenant);
        }
        st.queues
            .entry((class, who.tenant))
            .or_default()
            .push_back(ticket.clone());
        dispatch(&self.state, &mut st);
    }

    /// Slots free now (for tests and figures).
    #[cfg(test)]
    fn free(&self) -> usize {
        lock(&self.state).free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(slots: &FairSlots, tenant: u32, class: Class) -> oneshot::Receiver<Slot> {
        let (t, rx) = Ticket::new();
        slots.enqueue(
            &t,
            Requester {
                tenant: Tenant(tenant),
                class,
            },
        );
        rx
    }

    fn granted(rx: &mut oneshot::Receiver<Slot>) -> Option<Slot> {
        rx.try_recv().ok()
    }

    #[test]
    fn a_newcomers_demand_takes_the_next_freed_slot_ahead_of_a_long_queue() {
        let slots = FairSlots::new(2, 2);
        // Tenant 1 queues 100 fetches; two run.
        let mut a: Vec<_> = (0..100).map(|_| ticket(&slots, 1, Class::Demand)).collect();
        let mut running: Vec<Slot> = a
            .iter_mut()
            .take(2)
            .map(|rx| granted(rx).unwrap())
            .collect();
        assert!(granted(&mut a[2]).is_none());
        // Tenant 2 asks for one chunk: it waits for a slot, then gets the first freed one.
        let mut b = ticket(&slots, 2, Class::Demand);
        assert!(granted(&mut b).is_none());
        running.remove(0);
        let _b = granted(&mut b).expect("tenant 2 waited behind tenant 1's queue");
        assert!(granted(&mut a[2]).is_none());
    }

    #[test]
    fn demand_goes_before_prefetch_and_prefetch_uses_what_is_left() {
        let slots = FairSlots::new(1, 1);
        let mut p = ticket(&slots, 1, Class::Prefetch);
        let first = granted(&mut p).expect("an idle fetcher serves prefetch");
        let mut p2 = ticket(&slots, 1, Class::Prefetch);
        let mut d = ticket(&slots, 2, Class::Demand);
        drop(first);
        let second = granted(&mut d).expect("demand first");
        assert!(granted(&mut p2).is_none());
        drop(second);
        assert!(granted(&mut p2).is_some());
    }

    #[test]
    fn one_tenant_holds_at_most_its_cap_and_the_rest_stays_for_others() {
        let slots = FairSlots::new(4, 3);
        let mut a: Vec<_> = (0..10).map(|_| ticket(&slots, 1, Class::Demand)).collect();
        let held: Vec<Slot> = a.iter_mut().filter_map(granted).collect();
        assert_eq!(held.len(), 3);
        assert_eq!(slots.free(), 1, "one slot kept for other tenants");
        let mut b = ticket(&slots, 2, Class::Demand);
        assert!(granted(&mut b).is_some());
    }

    #[test]
    fn a_ticket_queued_for_two_tenants_is_handed_one_slot_by_whichever_turn_comes_first() {
        let slots = FairSlots::new(1, 1);
        let mut a0 = ticket(&slots, 1, Class::Demand);
        let running = granted(&mut a0).unwrap();
        let mut a: Vec<_> = (0..5).map(|_| ticket(&slots, 1, Class::Demand)).collect();
        // A chunk tenant 1 asked for last, which tenant 2 now waits for too.
        let (shared, mut rx) = Ticket::new();
        slots.enqueue(&shared, Requester::demand(Tenant(1)));
        slots.enqueue(&shared, Requester::demand(Tenant(2)));
        drop(running);
        let next = granted(&mut a[0]).expect("tenant 1's turn");
        drop(next);
        // Tenant 2's turn: the shared fetch runs without waiting for tenant 1's other four.
        let slot = granted(&mut rx).expect("tenant 2's turn hands the shared fetch its slot");
        assert_eq!(slot.tenant, Tenant(2));
        assert!(!shared.waiting());
        drop(slot);
        // The two tenants alternate; tenant 1's stale entry for the shared chunk is skipped.
        for rx in &mut a[1..] {
            drop(granted(rx).expect("tenant 1's queue goes on"));
        }
        assert_eq!(slots.free(), 1);
        assert!(lock(&slots.state).queues.is_empty());
    }

    #[test]
    fn a_fetch_that_gave_up_waiting_never_keeps_a_slot() {
        let slots = FairSlots::new(1, 1);
        let mut a = ticket(&slots, 1, Class::Demand);
        let running = granted(&mut a).unwrap();
        let gave_up = ticket(&slots, 2, Class::Demand);
        drop(gave_up);
        drop(running);
        assert_eq!(slots.free(), 1);
    }
}
