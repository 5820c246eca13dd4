// Package stores opens the idempotency store an example command asks for,
// so that every command offers the same choice (-store bolt|memory|redis|
// postgres) and the same error messages.
package stores

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/pgstore"
	"github.com/grpcidem/idempotency/redisstore"

	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/memstore"
)

// Kinds lists the stores Open knows, in the order the flags document them.
var Kinds = []string{"bolt", "memory", "redis", "postgres"}

// Config says which store to open and where.
type Config struct {
	// Kind is one of Kinds.
	Kind string
	// BoltPath is the bbolt file (Kind "bolt").
	BoltPath string
	// RedisAddr is the Redis host:port (Kind "redis").
	RedisAddr string
	// PostgresDSN is the PostgreSQL connection string (Kind "postgres").
	PostgresDSN string
	// BoltOptions are passed to boltstore.Open (Kind "bolt").
	BoltOptions []boltstore.Option
}

// RegisterFlags defines -store, -db, -redis and -postgres on fs and returns
// the Config they fill. The Redis and PostgreSQL defaults come from the
// environment (REDIS_ADDR, POSTGRES_DSN) when it sets them.
func RegisterFlags(fs *flag.FlagSet, defaultBoltPath string) *Config {
	c := new(Config)
	fs.StringVar(&c.Kind, "store", "bolt", "idempotency store: "+strings.Join(Kinds, "|"))
	fs.StringVar(&c.BoltPath, "db", defaultBoltPath, "bbolt file of -store bolt (created with mode 0600)")
	fs.StringVar(&c.RedisAddr, "redis", envOr("REDIS_ADDR", "127.0.0.1:6379"), "Redis address of -store redis")
	fs.StringVar(&c.PostgresDSN, "postgres", envOr("POSTGRES_DSN", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"), "PostgreSQL DSN of -store postgres")
	return c
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// connectTimeout bounds the first contact with a networked store, so that a
// server pointed at a store that is down says so instead of hanging.
const connectTimeout = 5 * time.Second

// Opened is an open store. Its Close also closes what Open created for it
// (the Redis client, the PostgreSQL pool).
type Opened struct {
	idempotency.Store
	// Description names the store for log lines, such as "bolt payments-idem.db".
	Description string
	closeExtra  func()
}

// Health reports whether the store can serve (idempotency.HealthChecker):
// what the store's own Health says, for the stores that have one.
func (o *Opened) Health(ctx context.Context) error {
	if hc, ok := o.Store.(idempotency.HealthChecker); ok {
		return hc.Health(ctx)
	}
	return nil
}

// Close closes the store, then its connections.
func (o *Opened) Close() error {
	err := o.Store.Close()
	if o.closeExtra != nil {
		o.closeExtra()
	}
	return err
}

// Open opens the store c names. For Redis and PostgreSQL it checks the
// connection first, and for PostgreSQL it creates the table if needed.
func Open(ctx context.Context, c Config) (*Opened, error) {
	switch c.Kind {
	case "bolt":
		if c.BoltPath == "" {
			return nil, errors.New("-store bolt needs a file: set -db")
		}
		s, err := boltstore.Open(c.BoltPath, c.BoltOptions...)
		if err != nil {
			return nil, err
		}
		return &Opened{Store: s, Description: "bolt " + c.BoltPath}, nil
	case "memory":
		return &Opened{Store: memstore.New(), Description: "memory (records are lost when the process exits)"}, nil
	case "redis":
		return openRedis(ctx, c.RedisAddr)
	case "postgres":
		return openPostgres(ctx, c.PostgresDSN)
	}
	return nil, fmt.Errorf("unknown store %q: use one of %s", c.Kind, strings.Join(Kinds, ", "))
}

func openRedis(ctx context.Context, addr string) (*Opened, error) {
	if addr == "" {
		return nil, errors.New("-store redis needs an address: set -redis host:port")
	}
	client := redis.NewClient(&redis.Options{Addr: addr})
	pctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	if err := client.Ping(pctx).Err(); err != nil {
		_ = client.Close()
		return nil, fmt.Errorf("redis at %s: %w", addr, err)
	}
	s, err := redisstore.New(client)
	if err != nil {
		_ = client.Close()
		return nil, err
	}
	return &Opened{Store: s, Description: "redis " + addr, closeExtra: func() { _ = client.Close() }}, nil
}

func openPostgres(ctx context.Context, dsn string) (*Opened, error) {
	if dsn == "" {
		return nil, errors.New("-store postgres needs a connection string: set -postgres")
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("-postgres: %w", err)
	}
	where := fmt.Sprintf("postgres %s:%d/%s", cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Database)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	cctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	if err := pool.Ping(cctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	s, err := pgstore.New(cctx, pool)
	if err != nil {
		pool.Close()
		return nil, err
	}
	if err := s.Migrate(cctx); err != nil {
		_ = s.Close()
		pool.Close()
		return nil, err
	}
	return &Opened{Store: s, Description: where, closeExtra: pool.Close}, nil
}
