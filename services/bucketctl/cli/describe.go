package cli

import (
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/status"
)

// Describe words a command's error for a terminal: a gRPC status in it
// reads as its sentence with its code after it ("no such object in bucket
// dev-hot (NotFound)"), not as Go prints a status ("rpc error: code =
// NotFound desc = ..."), which puts the code's name where an operator
// looks for what went wrong.
func Describe(err error) string {
	var se interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &se) {
		return err.Error()
	}
	st := se.GRPCStatus()
	return strings.Replace(err.Error(), st.Err().Error(), fmt.Sprintf("%s (%s)", st.Message(), st.Code()), 1)
}
