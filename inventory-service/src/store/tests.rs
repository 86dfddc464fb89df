//! The store's behaviour, each test run against both backends: an in-memory SQLite database and
//! a PostgreSQL database of its own.

use serde_json::Number;
use shared::money::Money;
use shared::pg::PgDatabase;
use shared::testing::postgres::TestDatabase;

use super::*;

/// Defines the async test function `$name(store: &dyn InventoryStore)` as two tests,
/// `$name::on_sqlite` and `$name::on_postgres`, so every store test runs against both backends
/// without being written twice.
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn on_sqlite() {
                let store = super::sqlite_store().await;
                super::$name(&store).await;
            }

            #[tokio::test]
            async fn on_postgres() {
                let test = super::TestDatabase::create().await;
                let store = super::pg_store(&test).await;
                super::$name(&store).await;
            }
        }
    };
}

pub(crate) async fn sqlite_store() -> SqliteInventoryStore {
    let pool = shared::db::connect("sqlite::memory:", MIGRATIONS)
        .await
        .expect("the database opens");
    SqliteInventoryStore::new(pool)
}

/// A store on `test`'s database, migrated: one "replica" (call it twice for two).
pub(crate) async fn pg_store(test: &TestDatabase) -> PgInventoryStore {
    let database = PgDatabase::connect(test.url(), PG_MIGRATIONS)
        .await
        .expect("the database opens");
    PgInventoryStore::new(database)
}

pub(crate) fn request(sku: &str, qty: u32, expires_in: time::Duration) -> ReserveStock {
    let now = OffsetDateTime::now_utc();
    ReserveStock {
        sku: sku.to_owned(),
        qty: Quantity::parse(&Number::from(qty)).expect("valid qty"),
        order_id: None,
        idempotency_key: None,
        now,
        expires_at: now + expires_in,
    }
}

/// Reserves `qty` of `sku`, expiring `expires_in` from now (negative: already due).
pub(crate) async fn reserve(
    store: &dyn InventoryStore,
    sku: &str,
    qty: u32,
    expires_in: time::Duration,
) -> Reservation {
    store
        .reserve(request(sku, qty, expires_in))
        .await
        .expect("reserved")
        .reservation
}

pub(crate) fn line(reservation: &Reservation) -> EventLine {
    EventLine {
        sku: reservation.sku.clone(),
        qty: reservation.qty,
        reservation_id: reservation.id,
        unit_price: Money(100),
    }
}

pub(crate) async fn stock(store: &dyn InventoryStore, sku: &str) -> Stock {
    store
        .get_stock(sku)
        .await
        .expect("reads")
        .expect("known sku")
}

on_both_backends!(expiry_gives_back_only_reservations_past_their_time);
async fn expiry_gives_back_only_reservations_past_their_time(store: &dyn InventoryStore) {
    reserve(store, "BK-12", 2, time::Duration::seconds(-1)).await;
    reserve(store, "BK-12", 3, time::Duration::minutes(10)).await;

    let expired = store
        .expire_due(OffsetDateTime::now_utc())
        .await
        .expect("sweeps");

    assert_eq!(expired, 1);
    assert_eq!(stock(store, "BK-12").await, Stock::new("BK-12", 100, 3));
}

on_both_backends!(committing_an_expired_reservation_takes_its_units_from_on_hand_again);
async fn committing_an_expired_reservation_takes_its_units_from_on_hand_again(
    store: &dyn InventoryStore,
) {
    let lapsed = reserve(store, "HD-44", 2, time::Duration::seconds(-1)).await;
    store
        .expire_due(OffsetDateTime::now_utc())
        .await
        .expect("sweeps");

    let applied = store
        .commit_order(Uuid::new_v4(), vec![line(&lapsed)])
        .await
        .expect("commits");

    assert_eq!(applied.retaken, 1);
    assert_eq!(stock(store, "HD-44").await, Stock::new("HD-44", 1, 0));
}

on_both_backends!(an_order_placed_after_its_cancellation_leaves_the_released_units_alone);
async fn an_order_placed_after_its_cancellation_leaves_the_released_units_alone(
    store: &dyn InventoryStore,
) {
    let reservation = reserve(store, "MG-07", 4, time::Duration::minutes(10)).await;
    store
        .cancel_order(Uuid::new_v4(), vec![line(&reservation)])
        .await
        .expect("cancels");

    let applied = store
        .commit_order(Uuid::new_v4(), vec![line(&reservation)])
        .await
        .expect("handled");

    assert_eq!(applied.unchanged, 1);
    assert_eq!(stock(store, "MG-07").await, Stock::new("MG-07", 50, 0));
}

on_both_backends!(a_line_that_misdescribes_its_reservation_changes_nothing_and_is_not_recorded);
async fn a_line_that_misdescribes_its_reservation_changes_nothing_and_is_not_recorded(
    store: &dyn InventoryStore,
) {
    let reservation = reserve(store, "TS-33", 2, time::Duration::minutes(10)).await;
    let message_id = Uuid::new_v4();
    let wrong = EventLine {
        qty: 3,
        ..line(&reservation)
    };

    let refused = store.commit_order(message_id, vec![wrong]).await;
    assert!(matches!(refused, Err(StoreError::LineMismatch { .. })));
    assert_eq!(stock(store, "TS-33").await, Stock::new("TS-33", 25, 2));

    // The inbox row was rolled back with the effect: a corrected redelivery does the work.
    let applied = store
        .commit_order(message_id, vec![line(&reservation)])
        .await
        .expect("commits");
    assert!(!applied.duplicate);
    assert_eq!(stock(store, "TS-33").await, Stock::new("TS-33", 23, 0));
}

on_both_backends!(a_batch_of_order_events_is_applied_together_or_not_at_all);
async fn a_batch_of_order_events_is_applied_together_or_not_at_all(store: &dyn InventoryStore) {
    let first = reserve(store, "BK-12", 1, time::Duration::minutes(10)).await;
    let second = reserve(store, "BK-12", 2, time::Duration::minutes(10)).await;
    let wrong = EventLine {
        qty: 5,
        ..line(&second)
    };
    let (placed, cancelled) = (Uuid::new_v4(), Uuid::new_v4());

    let refused = store
        .apply_order_events(vec![
            (placed, OrderEvent::Placed(vec![line(&first)])),
            (cancelled, OrderEvent::Cancelled(vec![wrong])),
        ])
        .await;
    assert!(matches!(refused, Err(StoreError::LineMismatch { .. })));
    assert_eq!(stock(store, "BK-12").await, Stock::new("BK-12", 100, 3));

    let applied = store
        .apply_order_events(vec![
            (placed, OrderEvent::Placed(vec![line(&first)])),
            (cancelled, OrderEvent::Cancelled(vec![line(&second)])),
            (placed, OrderEvent::Placed(vec![line(&first)])),
        ])
        .await
        .expect("applies");
    assert_eq!(applied.len(), 3);
    assert_eq!(applied[0].changed, 1);
    assert_eq!(applied[1].changed, 1);
    assert!(applied[2].duplicate, "the same message ID is applied once");
    assert_eq!(stock(store, "BK-12").await, Stock::new("BK-12", 99, 0));
}

on_both_backends!(releasing_a_committed_reservation_is_refused);
async fn releasing_a_committed_reservation_is_refused(store: &dyn InventoryStore) {
    let reservation = reserve(store, "ST-01", 1, time::Duration::minutes(10)).await;
    store
        .commit_order(Uuid::new_v4(), vec![line(&reservation)])
        .await
        .expect("commits");

    let refused = store.release(reservation.id).await;

    assert!(matches!(refused, Err(StoreError::Committed(id)) if id == reservation.id));
    assert_eq!(stock(store, "ST-01").await, Stock::new("ST-01", 499, 0));
}

on_both_backends!(a_replay_answers_its_first_reservation_even_once_the_stock_has_run_short);
async fn a_replay_answers_its_first_reservation_even_once_the_stock_has_run_short(
    store: &dyn InventoryStore,
) {
    let keyed = |qty: u32| ReserveStock {
        idempotency_key: Some(IdempotencyKey::parse(b"order-1:HD-44").expect("valid key")),
        ..request("HD-44", qty, time::Duration::minutes(10))
    };
    let first = store.reserve(keyed(2)).await.expect("reserved");
    // Only 1 of the 3 hoodies is left: a new reservation of 2 would be refused.
    let replay = store.reserve(keyed(2)).await.expect("replayed");

    assert!(replay.replayed);
    assert_eq!(replay.reservation, first.reservation);
    assert_eq!(replay.reservation.remaining_after, 1);
    assert!(matches!(
        store.reserve(keyed(1)).await,
        Err(StoreError::KeyReused)
    ));
    assert_eq!(stock(store, "HD-44").await, Stock::new("HD-44", 3, 2));
}

on_both_backends!(a_replay_while_stock_is_plentiful_takes_no_more_units);
async fn a_replay_while_stock_is_plentiful_takes_no_more_units(store: &dyn InventoryStore) {
    let keyed = || ReserveStock {
        idempotency_key: Some(IdempotencyKey::parse(b"order-2:MG-07").expect("valid key")),
        ..request("MG-07", 2, time::Duration::minutes(10))
    };
    let first = store.reserve(keyed()).await.expect("reserved");
    // Enough mugs for the replay's units to be taken again, and given back with its rollback.
    let replay = store.reserve(keyed()).await.expect("replayed");

    assert!(replay.replayed);
    assert_eq!(replay.reservation, first.reservation);
    assert_eq!(stock(store, "MG-07").await, Stock::new("MG-07", 50, 2));
}

on_both_backends!(releasing_twice_gives_the_units_back_once_and_answers_released_both_times);
async fn releasing_twice_gives_the_units_back_once_and_answers_released_both_times(
    store: &dyn InventoryStore,
) {
    let released = reserve(store, "MG-07", 2, time::Duration::minutes(10)).await;
    reserve(store, "MG-07", 3, time::Duration::minutes(10)).await;

    let first = store.release(released.id).await.expect("releases");
    let second = store.release(released.id).await.expect("releases again");

    assert_eq!(first, ReservationStatus::Released);
    assert_eq!(second, ReservationStatus::Released);
    assert_eq!(stock(store, "MG-07").await, Stock::new("MG-07", 50, 3));
    assert!(matches!(
        store.release(Uuid::new_v4()).await,
        Err(StoreError::UnknownReservation(_))
    ));
}

on_both_backends!(a_restock_below_the_reserved_units_is_refused_and_a_new_sku_is_created);
async fn a_restock_below_the_reserved_units_is_refused_and_a_new_sku_is_created(
    store: &dyn InventoryStore,
) {
    reserve(store, "TS-33", 5, time::Duration::minutes(10)).await;

    let refused = store.set_on_hand("TS-33", 4).await;
    let lowered = store.set_on_hand("TS-33", 5).await.expect("sets");
    let created = store.set_on_hand("NEW-1", 7).await.expect("creates");

    assert!(matches!(refused, Err(StoreError::InvalidLevel(reason)) if reason.contains("5 units")));
    assert_eq!(lowered, Stock::new("TS-33", 5, 5));
    assert_eq!(created, Stock::new("NEW-1", 7, 0));
    assert!(matches!(
        store.set_on_hand("NEW-1", -1).await,
        Err(StoreError::InvalidLevel(_))
    ));
    let skus: Vec<String> = store
        .list_stock()
        .await
        .expect("lists")
        .into_iter()
        .map(|stock| stock.sku)
        .collect();
    assert_eq!(skus, ["BK-12", "HD-44", "MG-07", "NEW-1", "ST-01", "TS-33"]);
}

on_both_backends!(a_short_or_unknown_sku_reserves_nothing_and_says_why);
async fn a_short_or_unknown_sku_reserves_nothing_and_says_why(store: &dyn InventoryStore) {
    let short = store
        .reserve(request("HD-44", 4, time::Duration::minutes(10)))
        .await;
    let unknown = store
        .reserve(request("NOPE", 1, time::Duration::minutes(10)))
        .await;

    assert!(matches!(
        short,
        Err(StoreError::InsufficientStock {
            requested: 4,
            available: 3,
            ..
        })
    ));
    assert!(matches!(unknown, Err(StoreError::UnknownSku(sku)) if sku == "NOPE"));
    assert_eq!(stock(store, "HD-44").await, Stock::new("HD-44", 3, 0));
}

on_both_backends!(cancelling_a_placed_order_puts_its_units_back_on_hand);
async fn cancelling_a_placed_order_puts_its_units_back_on_hand(store: &dyn InventoryStore) {
    let reservation = reserve(store, "BK-12", 4, time::Duration::minutes(10)).await;
    store
        .commit_order(Uuid::new_v4(), vec![line(&reservation)])
        .await
        .expect("commits");
    assert_eq!(stock(store, "BK-12").await, Stock::new("BK-12", 96, 0));

    let applied = store
        .cancel_order(Uuid::new_v4(), vec![line(&reservation)])
        .await
        .expect("cancels");

    assert_eq!(applied.changed, 1);
    assert_eq!(stock(store, "BK-12").await, Stock::new("BK-12", 100, 0));
    assert!(store.ping().await.is_ok());
}

/// A whole order of `lines` (sku, qty) for a new order ID, under `key` if given.
pub(crate) fn order(lines: &[(&str, u32)], key: Option<&str>) -> ReserveOrder {
    order_for(Uuid::new_v4(), lines, key)
}

pub(crate) fn order_for(order_id: Uuid, lines: &[(&str, u32)], key: Option<&str>) -> ReserveOrder {
    let now = OffsetDateTime::now_utc();
    ReserveOrder::new(
        order_id,
        lines
            .iter()
            .map(|&(sku, qty)| OrderLine {
                sku: sku.to_owned(),
                qty: Quantity::parse(&Number::from(qty)).expect("valid qty"),
            })
            .collect(),
        key.map(|key| IdempotencyKey::parse(key.as_bytes()).expect("valid key")),
        now,
        now + time::Duration::minutes(10),
    )
    .expect("a valid order")
}

on_both_backends!(a_whole_order_reserves_every_line_in_request_order);
async fn a_whole_order_reserves_every_line_in_request_order(store: &dyn InventoryStore) {
    let order_id = Uuid::new_v4();

    let reserved = store
        .reserve_order(order_for(
            order_id,
            &[("TS-33", 1), ("BK-12", 2), ("MG-07", 3)],
            None,
        ))
        .await
        .expect("reserved");

    assert!(!reserved.replayed);
    let lines: Vec<(&str, u32, i64)> = reserved
        .reservations
        .iter()
        .map(|r| (r.sku.as_str(), r.qty, r.remaining_after))
        .collect();
    assert_eq!(
        lines,
        [("TS-33", 1, 24), ("BK-12", 2, 98), ("MG-07", 3, 47)]
    );
    assert!(
        reserved
            .reservations
            .iter()
            .all(|r| r.order_id == Some(order_id))
    );
    assert_eq!(stock(store, "MG-07").await, Stock::new("MG-07", 50, 3));
    // Each line is an ordinary reservation: an order event commits it.
    let lines: Vec<EventLine> = reserved.reservations.iter().map(line).collect();
    store
        .commit_order(Uuid::new_v4(), lines)
        .await
        .expect("commits");
    assert_eq!(stock(store, "BK-12").await, Stock::new("BK-12", 98, 0));
}

on_both_backends!(a_short_line_reserves_nothing_of_the_order_and_names_every_short_line);
async fn a_short_line_reserves_nothing_of_the_order_and_names_every_short_line(
    store: &dyn InventoryStore,
) {
    let refused = store
        .reserve_order(order(
            &[("BK-12", 2), ("HD-44", 4), ("MG-07", 1), ("TS-33", 26)],
            Some("order-short"),
        ))
        .await;

    let Err(StoreError::OrderShort(shortages)) = refused else {
        panic!("expected a shortage, got {refused:?}");
    };
    assert_eq!(
        shortages,
        [
            Shortage {
                sku: "HD-44".to_owned(),
                requested: 4,
                available: 3
            },
            Shortage {
                sku: "TS-33".to_owned(),
                requested: 26,
                available: 25
            },
        ]
    );
    for (sku, on_hand) in [("BK-12", 100), ("HD-44", 3), ("MG-07", 50), ("TS-33", 25)] {
        assert_eq!(
            stock(store, sku).await,
            Stock::new(sku, on_hand, 0),
            "{sku}"
        );
    }
    // Refusals are not remembered: with stock back, the same key reserves.
    store.set_on_hand("HD-44", 10).await.expect("restocks");
    store.set_on_hand("TS-33", 30).await.expect("restocks");
    let reserved = store
        .reserve_order(order(
            &[("BK-12", 2), ("HD-44", 4), ("MG-07", 1), ("TS-33", 26)],
            Some("order-short"),
        ))
        .await
        .expect("reserved");
    assert!(!reserved.replayed);
}

on_both_backends!(an_unknown_sku_in_an_order_reserves_nothing_and_is_named);
async fn an_unknown_sku_in_an_order_reserves_nothing_and_is_named(store: &dyn InventoryStore) {
    // The unknown line comes after a short one and in SKU order after the known ones: it is
    // still what the answer names, since it is permanent.
    let refused = store
        .reserve_order(order(&[("BK-12", 1), ("HD-44", 9), ("ZZ-99", 1)], None))
        .await;

    assert!(
        matches!(&refused, Err(StoreError::UnknownSku(sku)) if sku == "ZZ-99"),
        "{refused:?}"
    );
    assert_eq!(stock(store, "BK-12").await, Stock::new("BK-12", 100, 0));
    assert_eq!(stock(store, "HD-44").await, Stock::new("HD-44", 3, 0));
}

on_both_backends!(replaying_an_order_answers_its_reservations_and_reserves_nothing_more);
async fn replaying_an_order_answers_its_reservations_and_reserves_nothing_more(
    store: &dyn InventoryStore,
) {
    let order_id = Uuid::new_v4();
    let key = order_id.to_string();
    let lines = [("HD-44", 2), ("BK-12", 1)];
    let first = store
        .reserve_order(order_for(order_id, &lines, Some(&key)))
        .await
        .expect("reserved");

    // Only 1 hoodie is left, so a new reservation of the order would be refused.
    let replay = store
        .reserve_order(order_for(order_id, &lines, Some(&key)))
        .await
        .expect("replayed");

    assert!(replay.replayed);
    assert_eq!(replay.reservations, first.reservations);
    assert_eq!(stock(store, "HD-44").await, Stock::new("HD-44", 3, 2));
    assert_eq!(stock(store, "BK-12").await, Stock::new("BK-12", 100, 1));
    // Each line is keyed as a one-line call for the order would be: its replay answers the line.
    let line_replay = store
        .reserve(ReserveStock {
            idempotency_key: Some(
                IdempotencyKey::parse(format!("{order_id}:BK-12").as_bytes()).expect("key"),
            ),
            ..request("BK-12", 1, time::Duration::minutes(10))
        })
        .await
        .expect("replayed");
    assert!(line_replay.replayed);
    assert_eq!(line_replay.reservation, first.reservations[1]);
}

on_both_backends!(an_order_key_reused_for_other_lines_is_refused_and_reserves_nothing);
async fn an_order_key_reused_for_other_lines_is_refused_and_reserves_nothing(
    store: &dyn InventoryStore,
) {
    store
        .reserve_order(order(&[("BK-12", 1), ("MG-07", 1)], Some("order-9")))
        .await
        .expect("reserved");

    for other in [
        vec![("BK-12", 1)],
        vec![("BK-12", 1), ("MG-07", 2)],
        vec![("BK-12", 1), ("TS-33", 1)],
        vec![("BK-12", 1), ("MG-07", 1), ("TS-33", 1)],
    ] {
        let refused = store.reserve_order(order(&other, Some("order-9"))).await;
        assert!(
            matches!(refused, Err(StoreError::KeyReused)),
            "{other:?}: {refused:?}"
        );
    }
    // A line key a one-line call took is not merged into a whole order either.
    store
        .reserve(ReserveStock {
            idempotency_key: Some(IdempotencyKey::parse(b"order-10:ST-01").expect("key")),
            ..request("ST-01", 1, time::Duration::minutes(10))
        })
        .await
        .expect("reserved");
    let refused = store
        .reserve_order(order(&[("ST-01", 1), ("TS-33", 1)], Some("order-10")))
        .await;
    assert!(matches!(refused, Err(StoreError::KeyReused)), "{refused:?}");

    assert_eq!(stock(store, "BK-12").await, Stock::new("BK-12", 100, 1));
    assert_eq!(stock(store, "MG-07").await, Stock::new("MG-07", 50, 1));
    assert_eq!(stock(store, "TS-33").await, Stock::new("TS-33", 25, 0));
    assert_eq!(stock(store, "ST-01").await, Stock::new("ST-01", 500, 1));
}

#[test]
fn an_order_needs_one_to_a_hundred_distinct_skus() {
    let now = OffsetDateTime::now_utc();
    let lines = |n: usize, sku: fn(usize) -> String| -> Vec<OrderLine> {
        (0..n)
            .map(|i| OrderLine {
                sku: sku(i),
                qty: Quantity::parse(&Number::from(1)).expect("valid"),
            })
            .collect()
    };
    let build = |lines| ReserveOrder::new(Uuid::new_v4(), lines, None, now, now);

    assert!(build(lines(MAX_ORDER_LINES, |i| format!("S-{i}"))).is_ok());
    let empty = build(Vec::new()).expect_err("no lines");
    let many = build(lines(MAX_ORDER_LINES + 1, |i| format!("S-{i}"))).expect_err("too many");
    let twice = build(lines(2, |_| "BK-12".to_owned())).expect_err("a sku twice");

    assert!(empty.contains("1 to 100"), "{empty}");
    assert!(many.contains("got 101"), "{many}");
    assert!(twice.contains("BK-12 appears more than once"), "{twice}");
}
