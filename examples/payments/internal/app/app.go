// Package app holds the example commands (server, client, demo) as
// functions of their arguments and output, so that tests run them in
// process, and what they share: the server's interceptor chain and the
// client's way of paying in each RPC kind.
package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// A Command runs with its arguments (without the program name) and its
// output streams until it is done or ctx ends.
type Command func(ctx context.Context, args []string, stdout, stderr io.Writer) error

// errUsage marks a command-line mistake; the flag package has already
// printed what is wrong and the usage.
var errUsage = errors.New("usage")

// Main runs cmd with the process's arguments until SIGINT or SIGTERM, and
// exits with status 1 if it fails, 2 on a command-line mistake.
func Main(name string, cmd Command) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := cmd(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
}

// parse parses args into fs and rejects positional arguments, which every
// command here would silently ignore otherwise.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return errUsage
	}
	return nil
}
