package pgstore

// ListSQL is the listing statement, for a test that checks its plan.
func (s *Store) ListSQL() string { return s.listSQL() }

// PrefixEnd is prefixEnd, for tests.
var PrefixEnd = prefixEnd
