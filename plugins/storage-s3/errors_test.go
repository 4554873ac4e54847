package s3store_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
)

func apiError(code string, status int) error {
	return &smithy.OperationError{ServiceID: "S3", OperationName: "GetObject", Err: &smithyhttp.ResponseError{
		Response: &smithyhttp.Response{Response: &http.Response{StatusCode: status}},
		Err:      &smithy.GenericAPIError{Code: code, Message: "from the server"},
	}}
}

func statusError(status int) error {
	return &smithy.OperationError{ServiceID: "S3", OperationName: "HeadObject", Err: &smithyhttp.ResponseError{
		Response: &smithyhttp.Response{Response: &http.Response{StatusCode: status}},
		Err:      errors.New("no body"),
	}}
}

func TestClassify(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		err  error
		want error
	}{
		{"NoSuchKey", apiError("NoSuchKey", 404), base.ErrNotFound},
		{"typed NoSuchKey", &types.NoSuchKey{}, base.ErrNotFound},
		{"HEAD 404", statusError(404), base.ErrNotFound},
		{"AccessDenied", apiError("AccessDenied", 403), base.ErrPermissionDenied},
		{"HEAD 403", statusError(403), base.ErrPermissionDenied},
		{"InvalidAccessKeyId", apiError("InvalidAccessKeyId", 403), base.ErrUnauthenticated},
		{"SignatureDoesNotMatch", apiError("SignatureDoesNotMatch", 403), base.ErrUnauthenticated},
		{"SlowDown", apiError("SlowDown", 503), base.ErrUnavailable},
		{"InternalError", apiError("InternalError", 500), base.ErrUnavailable},
		{"unknown code, status 502", apiError("Whatever", 502), base.ErrUnavailable},
		{"HEAD 503", statusError(503), base.ErrUnavailable},
		{"PreconditionFailed", apiError("PreconditionFailed", 412), base.ErrConflict},
		{"HEAD 412", statusError(412), base.ErrConflict},
		{"EntityTooLarge", apiError("EntityTooLarge", 400), base.ErrResourceExhausted},
		{"InvalidArgument", apiError("InvalidArgument", 400), base.ErrInvalidArgument},
		{"NoSuchBucket", apiError("NoSuchBucket", 404), base.ErrFailedPrecondition},
		{"connection refused", &smithyhttp.RequestSendError{Err: &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}}, base.ErrUnavailable},
		{"connection reset", fmt.Errorf("read: %w", syscall.ECONNRESET), base.ErrUnavailable},
		{"body cut short", fmt.Errorf("reading: %w", io.ErrUnexpectedEOF), base.ErrUnavailable},
		{"timeout inside the driver", fmt.Errorf("waiting: %w", context.DeadlineExceeded), base.ErrDeadlineExceeded},
		{"anything else", errors.New("surprise"), base.ErrInternal},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := s3store.Classify(c.err)
			if got != c.want {
				t.Errorf("Classify(%v) = %v, want %v", c.err, got, c.want)
			}
		})
	}
}

func TestPartSizeFor(t *testing.T) {
	t.Parallel()
	const mib = 1 << 20
	for _, c := range []struct {
		name          string
		part, size    int64
		want          int64
		wantExhausted bool
	}{
		{"unknown size", 16 * mib, -1, 16 * mib, false},
		{"small", 16 * mib, 1000, 16 * mib, false},
		{"exactly the most parts", 16 * mib, 16 * mib * s3store.MaxParts, 16 * mib, false},
		{"one byte more: larger parts, in whole MiB", 16 * mib, 16*mib*s3store.MaxParts + 1, 17 * mib, false},
		{"1 TiB in 5 MiB parts", 5 * mib, 1 << 40, 105 * mib, false},
		{"more than S3 can hold", 5 * mib, s3store.MaxParts*(5<<30) + 1, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := s3store.PartSizeFor(c.part, c.size)
			if c.wantExhausted {
				if !errors.Is(err, base.ErrResourceExhausted) {
					t.Fatalf("got %d, %v, want base.ErrResourceExhausted", got, err)
				}
				return
			}
			if err != nil || got != c.want {
				t.Fatalf("got %d, %v, want %d", got, err, c.want)
			}
			if c.size > 0 && (c.size+got-1)/got > s3store.MaxParts {
				t.Errorf("%d bytes in parts of %d need more than %d parts", c.size, got, s3store.MaxParts)
			}
		})
	}
}
