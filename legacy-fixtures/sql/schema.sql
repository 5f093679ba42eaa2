-- Legacy retail monolith: order management (oms) and warehouse management (wms) in one database.
--
-- Shaped like a long-lived app rather than a tidy model on purpose: mixed timestamp types, a
-- varchar here and a text there, an enum, jsonb and arrays, business logic in plpgsql, and a
-- storefront cache (oms.inventory_cache) that a lagging batch job copies from wms. walbridge must
-- cope with all of it without the legacy team changing anything.
--
-- Every table has a primary key: walbridge keys Kafka messages by it.
-- Functions take an optional timestamp (default now()) so the workload generator can drive a
-- simulated clock and stay deterministic; the legacy app simply omits it.

create schema oms;
create schema wms;

create type oms.order_status as enum ('pending', 'paid', 'shipped', 'delivered', 'cancelled', 'returned');

-- ---------------------------------------------------------------------------------------------
-- oms
-- ---------------------------------------------------------------------------------------------

create table oms.customers (
    id               bigserial primary key,
    email            varchar(255) not null,
    first_name       varchar(60)  not null,
    last_name        varchar(60)  not null,
    phone            varchar(32),
    street           text,
    city             varchar(80),
    postcode         varchar(12),
    country          char(2)      not null default 'GB',
    birth_date       date,
    marketing_opt_in boolean      not null default false,
    loyalty_points   integer      not null default 0,
    created_at       timestamptz  not null default now(),
    updated_at       timestamptz  not null default now()
);
create index customers_email_idx on oms.customers (lower(email));

create table oms.products (
    sku          varchar(32) primary key,
    name         varchar(200) not null,
    description  text,
    category     varchar(40)  not null,
    attributes   jsonb        not null default '{}',
    tags         text[]       not null default '{}',
    weight_grams integer,
    active       boolean      not null default true,
    created_at   timestamptz  not null default now(),
    updated_at   timestamptz  not null default now()
);
create index products_category_idx on oms.products (category);

-- One current price per sku and currency; the old app overwrites it in place.
create table oms.prices (
    sku        varchar(32)   not null references oms.products (sku),
    currency   char(3)       not null,
    price      numeric(12,2) not null check (price > 0),
    valid_from date          not null,
    updated_at timestamptz   not null default now(),
    primary key (sku, currency)
);

create table oms.orders (
    id          bigserial primary key,
    order_uuid  uuid              not null,
    customer_id bigint            not null references oms.customers (id),
    status      oms.order_status  not null default 'pending',
    currency    char(3)           not null default 'EUR',
    total       numeric(12,2)     not null default 0,
    channel     varchar(16)       not null default 'web',
    placed_at   timestamptz       not null default now(),
    updated_at  timestamptz       not null default now()
);
create unique index orders_uuid_idx on oms.orders (order_uuid);
create index orders_customer_idx on oms.orders (customer_id);

-- reserved_location: where place_order reserved the stock; shipping and cancelling use it.
create table oms.order_lines (
    order_id          bigint        not null references oms.orders (id),
    line_no           smallint      not null,
    sku               varchar(32)   not null,
    qty               integer       not null check (qty > 0),
    unit_price        numeric(12,2) not null,
    reserved_location varchar(16),
    primary key (order_id, line_no)
);
create index order_lines_sku_idx on oms.order_lines (sku);

create table oms.payments (
    id            bigserial primary key,
    order_id      bigint        not null references oms.orders (id),
    amount        numeric(12,2) not null,
    currency      char(3)       not null default 'EUR',
    method        varchar(20)   not null,
    status        varchar(20)   not null,
    psp_reference varchar(40),
    -- written by a payment module that predates time zones in this codebase
    authorized_at timestamp     not null
);
create index payments_order_idx on oms.payments (order_id);

create table oms.returns (
    id         bigserial primary key,
    order_id   bigint      not null references oms.orders (id),
    sku        varchar(32) not null,
    qty        integer     not null check (qty > 0),
    reason     text,
    created_at timestamp   not null
);
create index returns_order_idx on oms.returns (order_id);

-- Bookkeeping of the nightly/periodic batch jobs: when each last ran (its watermark).
create table oms.batch_jobs (
    job         varchar(40) primary key,
    last_run_at timestamptz,
    last_rows   integer
);

-- What the storefront shows; refreshed from wms.stock_levels by a batch job, so it lags.
create table oms.inventory_cache (
    sku           varchar(32) not null,
    location_code varchar(16) not null,
    available     integer     not null,
    refreshed_at  timestamptz not null,
    primary key (sku, location_code)
);

-- ---------------------------------------------------------------------------------------------
-- wms
-- ---------------------------------------------------------------------------------------------

create table wms.locations (
    code      varchar(16) primary key,
    name      varchar(80) not null,
    kind      text        not null check (kind in ('dc', 'warehouse', 'store')),
    city      varchar(80),
    is_active boolean     not null default true,
    opened_on date
);

create table wms.stock_levels (
    sku           varchar(32) not null,
    location_code varchar(16) not null,
    on_hand       integer     not null check (on_hand >= 0),
    reserved      integer     not null default 0 check (reserved >= 0 and reserved <= on_hand),
    updated_at    timestamptz not null default now(),
    primary key (sku, location_code)
);
-- Lets the inventory cache job find what changed since its last run.
create index stock_levels_updated_idx on wms.stock_levels (updated_at);

-- Signed quantities: the sum per (sku, location_code) equals stock_levels.on_hand.
create table wms.stock_movements (
    id            bigserial primary key,
    sku           varchar(32) not null,
    location_code varchar(16) not null,
    kind          text        not null check (kind in ('receipt', 'pick', 'adjustment', 'damage', 'return')),
    qty           integer     not null,
    ref_order_id  bigint,
    created_at    timestamptz not null default now()
);
create index stock_movements_sku_loc_idx on wms.stock_movements (sku, location_code);

create table wms.shipments (
    id            bigserial primary key,
    order_id      bigint      not null,
    location_code varchar(16) not null references wms.locations (code),
    carrier       varchar(20) not null,
    tracking_no   varchar(40),
    shipped_at    timestamptz not null,
    delivered_at  timestamptz
);
create index shipments_order_idx on wms.shipments (order_id);

create table wms.shipment_lines (
    shipment_id bigint      not null references wms.shipments (id),
    line_no     smallint    not null,
    sku         varchar(32) not null,
    qty         integer     not null check (qty > 0),
    primary key (shipment_id, line_no)
);

-- ---------------------------------------------------------------------------------------------
-- Legacy business logic
-- ---------------------------------------------------------------------------------------------

-- Inserts the order header and lines and reserves stock, all in the caller's transaction.
-- p_lines: [{"sku": "SKU-000001", "qty": 2}, ...]. Each line reserves at the location with the
-- most available stock; a line that no location can cover aborts the whole order.
create function oms.place_order(
    p_customer bigint,
    p_lines jsonb,
    p_at timestamptz default now(),
    p_uuid uuid default gen_random_uuid()
) returns bigint
language plpgsql as $$
declare
    v_order bigint;
    v_line record;
    v_price numeric(12,2);
    v_loc varchar(16);
    v_total numeric(12,2) := 0;
begin
    if p_lines is null or jsonb_typeof(p_lines) <> 'array' or jsonb_array_length(p_lines) = 0 then
        raise exception 'place_order: p_lines must be a non-empty json array' using errcode = '22023';
    end if;

    insert into oms.orders (order_uuid, customer_id, status, currency, total, channel, placed_at, updated_at)
    values (p_uuid, p_customer, 'pending', 'EUR', 0, 'web', p_at, p_at)
    returning id into v_order;

    for v_line in
        select e ->> 'sku' as sku, (e ->> 'qty')::int as qty, n::smallint as line_no
        from jsonb_array_elements(p_lines) with ordinality as t(e, n)
    loop
        if v_line.sku is null or v_line.qty is null or v_line.qty <= 0 then
            raise exception 'place_order: line % needs a sku and a positive qty', v_line.line_no
                using errcode = '22023';
        end if;

        select price into v_price from oms.prices where sku = v_line.sku and currency = 'EUR';
        if not found then
            raise exception 'place_order: no EUR price for sku %', v_line.sku using errcode = '22023';
        end if;

        select location_code into v_loc
        from wms.stock_levels
        where sku = v_line.sku and on_hand - reserved >= v_line.qty
        order by on_hand - reserved desc, location_code
        limit 1
        for update;
        if not found then
            raise exception 'place_order: insufficient stock for sku % qty %', v_line.sku, v_line.qty;
        end if;

        update wms.stock_levels
        set reserved = reserved + v_line.qty, updated_at = p_at
        where sku = v_line.sku and location_code = v_loc;

        insert into oms.order_lines (order_id, line_no, sku, qty, unit_price, reserved_location)
        values (v_order, v_line.line_no, v_line.sku, v_line.qty, v_price, v_loc);

        v_total := v_total + v_price * v_line.qty;
    end loop;

    update oms.orders set total = v_total where id = v_order;
    return v_order;
end;
$$;

-- Changes every price of a category by p_pct percent in one statement (one big transaction).
create function oms.bulk_reprice(p_category text, p_pct numeric, p_at timestamptz default now())
returns integer
language plpgsql as $$
declare
    v_rows integer;
begin
    if p_pct is null or p_pct <= -100 then
        raise exception 'bulk_reprice: p_pct must be greater than -100, got %', p_pct using errcode = '22023';
    end if;

    update oms.prices pr
    set price = greatest(round(pr.price * (1 + p_pct / 100), 2), 0.01),
        valid_from = (p_at at time zone 'UTC')::date,
        updated_at = p_at
    from oms.products p
    where p.sku = pr.sku and p.category = p_category;

    get diagnostics v_rows = row_count;
    return v_rows;
end;
$$;

-- The lagging batch job: copies available stock (on_hand - reserved) into the storefront cache.
-- Incremental like the original: only stock levels updated since the job's previous run are
-- looked at (>= so a write stamped exactly at the watermark is not lost), and only rows whose
-- value changed are written, so refreshed_at tells when a row last moved.
create function oms.refresh_inventory_cache(p_at timestamptz default now())
returns integer
language plpgsql as $$
declare
    v_since timestamptz;
    v_rows integer;
begin
    select last_run_at into v_since from oms.batch_jobs where job = 'refresh_inventory_cache' for update;

    insert into oms.inventory_cache as c (sku, location_code, available, refreshed_at)
    select sku, location_code, greatest(on_hand - reserved, 0), p_at
    from wms.stock_levels
    where v_since is null or updated_at >= v_since
    on conflict (sku, location_code) do update
        set available = excluded.available, refreshed_at = excluded.refreshed_at
        where c.available is distinct from excluded.available;
    get diagnostics v_rows = row_count;

    insert into oms.batch_jobs as j (job, last_run_at, last_rows)
    values ('refresh_inventory_cache', p_at, v_rows)
    on conflict (job) do update set last_run_at = excluded.last_run_at, last_rows = excluded.last_rows;
    return v_rows;
end;
$$;
