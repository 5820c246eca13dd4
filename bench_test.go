package idempotency_test

import (
	"context"
	"encoding/binary"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/internal/cpuclock"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/memstore"
)

// benchPayments answers at once, so that the benchmarks measure the
// interceptor and the store, not the handler.
type benchPayments struct {
	testpb.UnimplementedPaymentServiceServer
}

func (benchPayments) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	return &testpb.ChargeResponse{ChargeId: "ch_0123456789abcdef", Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

// ChargeInstallments sends its installments at once, with ids that cost
// nothing to make.
func (benchPayments) ChargeInstallments(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	_ = ss.SetHeader(metadata.Pairs("x-plan", "installments"))
	amount := req.AmountCents / int64(req.Count)
	for i := range req.Count {
		if err := ss.Send(&testpb.ChargeResponse{ChargeId: "ch_" + strconv.Itoa(int(i)) + "_0123456789ab", Account: req.Account, AmountCents: amount, Currency: req.Currency}); err != nil {
			return err
		}
	}
	ss.SetTrailer(metadata.Pairs("x-count", "done"))
	return nil
}

// benchClient starts a bufconn server with the interceptors on store (none
// when store is nil) and returns a client for it.
func benchClient(b *testing.B, store idempotency.Store) testpb.PaymentServiceClient {
	b.Helper()
	var opts []grpc.ServerOption
	if store != nil {
		opts = mustServer(store).ServerOptions()
	}
	return serveBench(b, benchPayments{}, opts...)
}

// serveBench starts a bufconn server of svc with opts and returns a client
// for it.
func serveBench(b *testing.B, svc testpb.PaymentServiceServer, opts ...grpc.ServerOption) testpb.PaymentServiceClient {
	b.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(opts...)
	testpb.RegisterPaymentServiceServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		conn.Close()
		srv.Stop()
	})
	return testpb.NewPaymentServiceClient(conn)
}

// BenchmarkUnary measures the cost of one call over bufconn: without the
// interceptor (baseline; keyed: with a fresh key in the metadata all the
// same), and with it on each store, for first executions (a fresh key per
// call) and replays (one key). -cpu sets GOMAXPROCS; the p64 variants run
// 64 callers at once.
//
//	go test -run '^$' -bench BenchmarkUnary -benchmem -count 5 .
func BenchmarkUnary(b *testing.B) {
	type storeCase struct {
		name string
		open func(b *testing.B) idempotency.Store
	}
	cases := []storeCase{
		{"none", nil},
		{"memory", func(b *testing.B) idempotency.Store {
			s := memstore.New()
			b.Cleanup(func() { s.Close() })
			return s
		}},
		{"bolt", func(b *testing.B) idempotency.Store {
			s, err := boltstore.Open(filepath.Join(b.TempDir(), "bench.db"))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { s.Close() })
			return s
		}},
	}
	for _, sc := range cases {
		modes := []string{"first", "replay"}
		if sc.open == nil {
			// keyed: the client sends a fresh key, which nothing reads:
			// what sending it costs, apart from the interceptor.
			modes = []string{"baseline", "keyed"}
		}
		for _, mode := range modes {
			for _, par := range []int{1, 64} {
				b.Run(sc.name+"/"+mode+"/p"+strconv.Itoa(par), func(b *testing.B) {
					var store idempotency.Store
					if sc.open != nil {
						store = sc.open(b)
					}
					withKey := freshKeys()
					switch {
					case store == nil && mode == "baseline":
						withKey = nil
					case mode == "replay":
						// A replay's key is the same on every call, as a
						// client's retries carry it.
						replayCtx := metadata.AppendToOutgoingContext(context.Background(), idempotency.KeyHeader, "the-one-key")
						withKey = func(context.Context) context.Context { return replayCtx }
					}
					runCalls(b, benchClient(b, store), par, withKey)
					if bs, ok := store.(*boltstore.Store); ok && mode == "first" {
						reportCommits(b, bs)
					}
				})
			}
		}
	}
}

// reportCommits reports how many first executions shared each of s's
// commits, and how long a commit took.
func reportCommits(b *testing.B, s *boltstore.Store) {
	st := s.Stats()
	b.ReportMetric(float64(st.Records)/float64(st.Commits), "records/commit")
	b.ReportMetric(float64(st.CommitTime.Microseconds())/float64(st.Commits), "µs/commit")
}

// freshKeys returns what gives each first execution its own key.
func freshKeys() func(context.Context) context.Context {
	var seq atomic.Int64
	return func(ctx context.Context) context.Context {
		return metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, "k-"+strconv.FormatInt(seq.Add(1), 36))
	}
}

// runCalls times Charge calls on client by par callers at once, each in
// withKey's context, which carries its idempotency key (none when withKey is
// nil). One untimed call
// first warms up the connection (and stores the record a replay needs). It
// reports cpu-µs/op, the process's CPU time (user and system) per call:
// against ns/op and the cores, it tells whether a benchmark was bound by the
// CPU or by waiting.
func runCalls(b *testing.B, client testpb.PaymentServiceClient, par int, withKey func(context.Context) context.Context) {
	b.Helper()
	req := &testpb.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	call := func(ctx context.Context) {
		if withKey != nil {
			ctx = withKey(ctx)
		}
		if _, err := client.Charge(ctx, req); err != nil {
			b.Error(err)
		}
	}
	ctx := context.Background()
	call(ctx)
	b.ReportAllocs()
	cpu, cpuOK := cpuclock.Process()
	b.ResetTimer()
	if par == 1 {
		for b.Loop() {
			call(ctx)
		}
	} else {
		b.SetParallelism(max(1, par/runtimeProcs()))
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				call(ctx)
			}
		})
	}
	b.StopTimer()
	if now, ok := cpuclock.Process(); ok && cpuOK {
		b.ReportMetric(float64((now-cpu).Microseconds())/float64(b.N), "cpu-µs/op")
	}
}

// BenchmarkCommitLatency shows what the latency of a durable commit does to
// first executions at p64, with everything else equal: a memory store whose
// completions are group-committed like BoltStore's (one loop takes every
// completion waiting, a lone one at once) by a "commit" that waits a set
// time without using a core, as an fsync does. Against the baseline in the
// same run, it shows the commit latency at which a store can reach a given
// share of the no-interceptor throughput on this machine; compare µs/commit
// with BenchmarkUnary/bolt/first/p64's. bolt-nosync is BoltStore with
// bbolt's fsyncs turned off: the share its own CPU work leaves.
//
//	go test -run '^$' -bench BenchmarkCommitLatency -count 6 .
func BenchmarkCommitLatency(b *testing.B) {
	b.Run("none/baseline/p64", func(b *testing.B) {
		runCalls(b, benchClient(b, nil), 64, nil)
	})
	// bbolt without its fsyncs (NoSync: never for production): what its
	// own work costs when a commit waits for no disk.
	b.Run("bolt-nosync/first/p64", func(b *testing.B) {
		s, err := boltstore.Open(filepath.Join(b.TempDir(), "nosync.db"), boltstore.WithBoltOptions(&bolt.Options{NoSync: true}))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { s.Close() })
		runCalls(b, benchClient(b, s), 64, freshKeys())
		reportCommits(b, s)
	})
	for _, latency := range []time.Duration{0, 250 * time.Microsecond, 500 * time.Microsecond, time.Millisecond} {
		b.Run("commit="+latency.String()+"/first/p64", func(b *testing.B) {
			store := newDelayedCommit(latency)
			b.Cleanup(func() { store.Close() })
			runCalls(b, benchClient(b, store), 64, freshKeys())
			commits := store.commits.Load()
			b.ReportMetric(float64(store.records.Load())/float64(commits), "records/commit")
			b.ReportMetric(float64(store.waited.Load())/1e3/float64(commits), "µs/commit")
		})
	}
}

// delayedCommit is a memory store whose Complete returns once a group commit
// that lasts latency has taken it.
type delayedCommit struct {
	*memstore.Store
	latency                  time.Duration
	queue                    chan chan struct{}
	stop                     chan struct{}
	done                     sync.WaitGroup
	commits, records, waited atomic.Int64
}

func newDelayedCommit(latency time.Duration) *delayedCommit {
	s := &delayedCommit{Store: memstore.New(), latency: latency,
		queue: make(chan chan struct{}, 1024), stop: make(chan struct{})}
	s.done.Add(1)
	go s.commitLoop()
	return s
}

func (s *delayedCommit) commitLoop() {
	defer s.done.Done()
	var batch []chan struct{}
	for {
		select {
		case c := <-s.queue:
			batch = append(batch[:0], c)
		case <-s.stop:
			return
		}
	gather:
		for {
			select {
			case c := <-s.queue:
				batch = append(batch, c)
			default:
				break gather
			}
		}
		start := time.Now()
		if s.latency > 0 {
			time.Sleep(s.latency)
		}
		s.waited.Add(int64(time.Since(start)))
		s.commits.Add(1)
		s.records.Add(int64(len(batch)))
		for _, c := range batch {
			close(c)
		}
	}
}

func (s *delayedCommit) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	committed := make(chan struct{})
	s.queue <- committed
	<-committed
	return s.Store.Complete(ctx, key, token, record, retention)
}

func (s *delayedCommit) Close() error {
	close(s.stop)
	s.done.Wait()
	return s.Store.Close()
}

func runtimeProcs() int { return runtime.GOMAXPROCS(0) }

// BenchmarkBoltCommit is the floor of a durable first execution on bbolt,
// measured on the same disk in the same run as BenchmarkUnary/bolt/first/p1:
//
//   - same-record: one bbolt transaction that writes what BoltStore writes for
//     one first execution of BenchmarkUnary (the record a real call stored,
//     under a fresh key, and its expiry index entry), with its two fsyncs;
//   - one-value: one 200-byte value in one bucket, as an earlier version of
//     this benchmark wrote: fewer pages than a record and its expiry entry;
//   - store: BoltStore's Reserve and Complete of that record, called in
//     process: the same commit, through the store's group commit.
//
// A first execution over gRPC should cost a bare call plus same-record.
//
//	go test -run '^$' -bench 'BenchmarkBoltCommit|BenchmarkUnary/(none|bolt)/(baseline|first)/p1$' -count 6 .
func BenchmarkBoltCommit(b *testing.B) {
	record := storedRecord(b)
	b.Run("same-record", func(b *testing.B) {
		commit := rawCommitter(b, record)
		cpu, cpuOK := cpuclock.Process()
		b.ResetTimer()
		for b.Loop() {
			commit()
		}
		b.StopTimer()
		if now, ok := cpuclock.Process(); ok && cpuOK {
			b.ReportMetric(float64((now-cpu).Microseconds())/float64(b.N), "cpu-µs/op")
		}
	})
	// The same commit made by the handler of a call without the
	// interceptor: a bare call plus same-record, as grpc-go runs it (on its
	// goroutine for the call, whose stack grows in bbolt, with every other
	// goroutine of the process idle during the fsyncs). It is the floor of
	// any layer that stores the outcome durably before answering.
	b.Run("in-handler", func(b *testing.B) {
		client := serveBench(b, committingPayments{commit: rawCommitter(b, record)})
		runCalls(b, client, 1, nil)
	})
	// What the issue first compared against: one value in one bucket,
	// which dirties fewer pages than a record and its expiry entry.
	b.Run("one-value", func(b *testing.B) {
		db, err := bolt.Open(filepath.Join(b.TempDir(), "one.db"), 0o600, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer db.Close()
		value := make([]byte, 200)
		var seq uint64
		for b.Loop() {
			seq++
			err := db.Update(func(tx *bolt.Tx) error {
				bk, err := tx.CreateBucketIfNotExists([]byte("b"))
				if err != nil {
					return err
				}
				return bk.Put([]byte(strconv.FormatUint(seq, 36)), value)
			})
			if err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("store", func(b *testing.B) {
		s, err := boltstore.Open(filepath.Join(b.TempDir(), "store.db"))
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		ctx := context.Background()
		var seq uint64
		cpu, cpuOK := cpuclock.Process()
		b.ResetTimer()
		for b.Loop() {
			seq++
			key := idempotency.StoreKey("", "k-"+strconv.FormatUint(seq, 36))
			claim := idempotency.Claim{Token: "t-" + key, Lease: idempotency.DefaultLease, Held: true}
			if _, err := s.Reserve(ctx, key, claim); err != nil {
				b.Fatal(err)
			}
			if err := s.Complete(ctx, key, claim.Token, record, idempotency.DefaultRetention); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		if now, ok := cpuclock.Process(); ok && cpuOK {
			b.ReportMetric(float64((now-cpu).Microseconds())/float64(b.N), "cpu-µs/op")
		}
		reportCommits(b, s)
	})
}

// rawCommitter returns a function that commits record under a fresh key,
// with its expiry index entry, in a bbolt file of its own: what BoltStore
// writes for one first execution, in one transaction of bbolt's own.
func rawCommitter(b *testing.B, record []byte) func() {
	b.Helper()
	db, err := bolt.Open(filepath.Join(b.TempDir(), "raw.db"), 0o600, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	records, expiry := []byte(boltstore.DefaultBucket), []byte(boltstore.DefaultBucket+".expiry")
	if err := db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucket(records); err != nil {
			return err
		}
		_, err := tx.CreateBucket(expiry)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	value := make([]byte, 8+len(record))
	copy(value[8:], record)
	var seq uint64
	return func() {
		seq++
		key := idempotency.StoreKey("", "k-"+strconv.FormatUint(seq, 36))
		binary.BigEndian.PutUint64(value, uint64(time.Now().Add(idempotency.DefaultRetention).UnixNano()))
		err := db.Update(func(tx *bolt.Tx) error {
			if err := tx.Bucket(records).Put([]byte(key), value); err != nil {
				return err
			}
			return tx.Bucket(expiry).Put(append(value[:8:8], key...), nil)
		})
		if err != nil {
			b.Error(err)
		}
	}
}

// committingPayments is benchPayments whose Charge first calls commit (one
// caller at a time): a bbolt commit of its own, or a blocking system call.
type committingPayments struct {
	benchPayments
	commit func()
}

func (p committingPayments) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	p.commit()
	return p.benchPayments.Charge(ctx, req)
}

// storedRecord returns the record BoltStore stores for a first execution of
// BenchmarkUnary's call.
func storedRecord(b *testing.B) []byte {
	b.Helper()
	s, err := boltstore.Open(filepath.Join(b.TempDir(), "record.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := metadata.AppendToOutgoingContext(context.Background(), idempotency.KeyHeader, "k-1")
	if _, err := benchClient(b, s).Charge(ctx, &testpb.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}); err != nil {
		b.Fatal(err)
	}
	var record []byte
	if err := s.Records(func(_ string, e idempotency.Entry) bool { record = e.Record; return false }); err != nil || record == nil {
		b.Fatalf("no record stored: %v", err)
	}
	return record
}

// quietUnaryOnly is for BenchmarkInterceptorOnly, which calls the unary
// interceptor alone: the Server's warning that the stream interceptor is not
// installed would otherwise break its benchmark lines.
var quietUnaryOnly = idempotency.WithLogger(slog.New(slog.DiscardHandler))

// BenchmarkInterceptorOnly measures the unary server interceptor alone,
// called in process with a no-op transport: what idempotency adds to a call,
// without the network and gRPC's own work, which dominate and vary the
// bufconn numbers.
//
//	go test -run '^$' -bench BenchmarkInterceptorOnly -benchmem .
func BenchmarkInterceptorOnly(b *testing.B) {
	info := &grpc.UnaryServerInfo{FullMethod: testpb.PaymentService_Charge_FullMethodName}
	req := &testpb.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	handler := func(ctx context.Context, r any) (any, error) {
		return benchPayments{}.Charge(ctx, r.(*testpb.ChargeRequest))
	}
	stores := map[string]func(b *testing.B) idempotency.Store{
		"memory": func(b *testing.B) idempotency.Store { return memstore.New() },
		"bolt": func(b *testing.B) idempotency.Store {
			s, err := boltstore.Open(filepath.Join(b.TempDir(), "bench.db"))
			if err != nil {
				b.Fatal(err)
			}
			return s
		},
	}
	for _, name := range []string{"memory", "bolt"} {
		b.Run(name+"/replay", func(b *testing.B) {
			store := stores[name](b)
			defer store.Close()
			unary := mustServer(store, quietUnaryOnly).UnaryServerInterceptor()
			ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(idempotency.KeyHeader, "the-one-key"))
			ctx = grpc.NewContextWithServerTransportStream(ctx, nopTransport{})
			if _, err := unary(ctx, req, info, handler); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := unary(ctx, req, info, handler); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	// A first execution on the memory store, with a fresh key per call:
	// the engine's own cost (the keys' contexts are made before the timer).
	b.Run("memory/first", func(b *testing.B) {
		store := memstore.New()
		defer store.Close()
		unary := mustServer(store, quietUnaryOnly).UnaryServerInterceptor()
		b.ReportAllocs()
		ctxs := make([]context.Context, 0, 1<<16)
		seq := 0
		for b.Loop() {
			if len(ctxs) == 0 {
				b.StopTimer()
				for range cap(ctxs) {
					seq++
					ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(idempotency.KeyHeader, "k-"+strconv.Itoa(seq)))
					ctxs = append(ctxs, grpc.NewContextWithServerTransportStream(ctx, nopTransport{}))
				}
				b.StartTimer()
			}
			ctx := ctxs[len(ctxs)-1]
			ctxs = ctxs[:len(ctxs)-1]
			if _, err := unary(ctx, req, info, handler); err != nil {
				b.Fatal(err)
			}
		}
	})
}
