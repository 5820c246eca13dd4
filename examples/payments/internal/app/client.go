package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/grpcidem/idempotency"
)

// Dial connects to a payments server through the idempotency client
// interceptors: every call gets a key (a fresh one unless the call sets its
// own), and unary calls and server streams that fail with a retryable code
// are retried with that same key, up to maxAttempts calls in all.
func Dial(addr string, maxAttempts int, extra ...grpc.DialOption) (*grpc.ClientConn, error) {
	retry := []idempotency.CallOption{
		idempotency.WithMaxAttempts(maxAttempts),
		idempotency.WithBackoff(50*time.Millisecond, time.Second),
	}
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor(retry...)),
		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor(retry...)),
	}, extra...)
	return grpc.NewClient(addr, opts...)
}

// RunClient is the payments client command; see ../../client.
func RunClient(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:50051", "server address")
	account := fs.String("account", "acct_demo", "account to charge")
	amount := fs.Int64("amount", 1250, "amount in cents")
	currency := fs.String("currency", "EUR", "currency code")
	mode := fs.String("mode", "unary", "RPC to pay with: "+strings.Join(Modes, "|"))
	count := fs.Int("count", 3, "charges per payment for installments, batch and interactive (the amount is split among them)")
	n := fs.Int("n", 1, "number of payments")
	key := fs.String("key", "", "idempotency key of every payment (default: a fresh key per payment); with -n > 1, the payments after the first are replays")
	tenant := fs.String("tenant", "", "x-tenant header: the scope of the keys (default: the server's \"public\")")
	attempts := fs.Int("attempts", 5, "calls per payment at most, retries included")
	timeout := fs.Duration("timeout", 10*time.Second, "deadline of each payment, retries included")
	if err := parse(fs, args); err != nil {
		return err
	}
	if !slices.Contains(Modes, *mode) {
		return fmt.Errorf("-mode %q: use one of %s", *mode, strings.Join(Modes, ", "))
	}
	if *n < 1 {
		return fmt.Errorf("-n is %d; it must be at least 1", *n)
	}
	if *key != "" {
		if err := idempotency.ValidateKey(*key); err != nil {
			return fmt.Errorf("-key: %w", err)
		}
	}

	conn, err := Dial(*addr, *attempts)
	if err != nil {
		return err
	}
	defer conn.Close()
	p := newPayer(conn, *attempts, 50*time.Millisecond, time.Second)
	if *tenant != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, TenantHeader, *tenant)
	}

	failed := 0
	for i := 1; i <= *n; i++ {
		pm := Payment{Mode: *mode, Key: *key, Account: *account, AmountCents: *amount, Currency: *currency, Parts: *count}
		if pm.Key == "" {
			// The key is made here, not by the interceptor, so that it can
			// be printed and, in a real client, saved with the order first.
			pm.Key = idempotency.NewKey()
		}
		pctx, cancel := context.WithTimeout(ctx, *timeout)
		rc, err := p.pay(pctx, pm)
		cancel()
		fmt.Fprintf(stdout, "payment %d/%d  key %s  attempts %d  ", i, *n, pm.Key, rc.Attempts)
		if err != nil {
			failed++
			fmt.Fprintf(stdout, "error: %v\n", err)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			continue
		}
		fmt.Fprintf(stdout, "replayed %t\n", rc.Replayed)
		for _, c := range rc.Charges {
			fmt.Fprintf(stdout, "  charge %s  %s  %s %s\n", c.GetChargeId(), c.GetAccount(), formatCents(c.GetAmountCents()), c.GetCurrency())
		}
	}
	if failed > 0 {
		return errors.New(plural(failed, "payment") + " failed")
	}
	return nil
}

func formatCents(c int64) string {
	sign := ""
	if c < 0 {
		sign, c = "-", -c
	}
	return fmt.Sprintf("%s%d.%02d", sign, c/100, c%100)
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
