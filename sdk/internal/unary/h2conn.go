package unary

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// StreamWindow and ConnWindow are the flow-control windows of a local
// plugin connection, at both ends and on both the grpc-go and this
// package's connections (sdk's serverTuning and dialTuning): large enough
// that a storage stream is not throttled by the window.
const (
	StreamWindow = 4 << 20
	ConnWindow   = 16 << 20
)

const (
	// Until the server's SETTINGS say otherwise (RFC 9113 §6.5.2).
	defaultWindow    = 65535
	defaultFrameSize = 16384

	ioBufferSize = 32 << 10
	maxStreamID  = math.MaxInt32
	// maxMessage is go-plugin's receive limit for a message.
	maxMessage = math.MaxInt32
)

// h2conn is one HTTP/2 connection that carries one call at a time.
type h2conn struct {
	nc   net.Conn
	bw   *bufio.Writer
	fr   *http2.Framer
	henc *hpack.Encoder
	hbuf bytes.Buffer

	nextID       uint32
	maxFrame     uint32 // the largest frame the server accepts
	peerWindow   int64  // the server's initial stream window
	connSend     int64  // what the connection may still send
	connUnacked  uint32 // received and not yet returned with WINDOW_UPDATE
	goAway       bool
	broken       bool
	reused       bool
	idleSince    time.Time
	cur          *stream
	deadlineSet  bool
	headerScheme string
}

// stream is the state of the call in flight.
type stream struct {
	id         uint32
	deadline   time.Time // the call's, if it has one
	send       int64     // the stream's send window
	unacked    uint32
	gotHeaders bool
	data       []byte
	done       bool
	err        error // the call's result once done; nil means OK
}

func dial(ctx context.Context, addr net.Addr, tlsConfig *tls.Config) (*h2conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, addr.Network(), addr.String())
	if err != nil {
		return nil, err
	}
	h := &h2conn{nextID: 1, maxFrame: defaultFrameSize, peerWindow: defaultWindow, connSend: defaultWindow, headerScheme: "http"}
	if tlsConfig != nil {
		cfg := tlsConfig.Clone()
		cfg.NextProtos = []string{"h2"} // grpc-go's server requires ALPN
		if cfg.ServerName == "" {
			cfg.ServerName = "localhost"
		}
		tc := tls.Client(nc, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			_ = nc.Close()
			return nil, fmt.Errorf("tls handshake: %w", err)
		}
		nc, h.headerScheme = tc, "https"
	}
	h.nc = nc
	h.bw = bufio.NewWriterSize(nc, ioBufferSize)
	h.fr = http2.NewFramer(h.bw, bufio.NewReaderSize(nc, ioBufferSize))
	h.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	h.henc = hpack.NewEncoder(&h.hbuf)
	// The preface goes out with the first call's frames.
	_, _ = h.bw.WriteString(http2.ClientPreface)
	if err := h.fr.WriteSettings(
		http2.Setting{ID: http2.SettingEnablePush, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: StreamWindow},
	); err != nil {
		_ = nc.Close()
		return nil, err
	}
	if err := h.fr.WriteWindowUpdate(0, ConnWindow-defaultWindow); err != nil {
		_ = nc.Close()
		return nil, err
	}
	return h, nil
}

func (h *h2conn) close() { _ = h.nc.Close() }

func (h *h2conn) reusable() bool { return !h.broken && !h.goAway && h.nextID < maxStreamID }

// longAgo is a deadline in the past: it interrupts a blocked read or write.
var longAgo = time.Unix(1, 0)

// call sends msg, one request message with its prefix (encodeMessage), to
// method and returns the response message, or the call's status as an
// error.
func (h *h2conn) call(ctx context.Context, method string, msg []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	deadline, hasDeadline := ctx.Deadline()
	if hasDeadline && !time.Now().Before(deadline) {
		return nil, status.Error(codes.DeadlineExceeded, context.DeadlineExceeded.Error())
	}
	if hasDeadline || h.deadlineSet { // the zero deadline clears the last call's
		_ = h.nc.SetDeadline(deadline)
		h.deadlineSet = hasDeadline
	}
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() { _ = h.nc.SetDeadline(longAgo) })
		defer func() {
			if !stop() {
				// The cancellation has set (or is setting) a deadline in
				// the past: this connection is not used again.
				h.broken = true
			}
		}()
	}

	s := &stream{id: h.nextID, send: h.peerWindow, deadline: deadline}
	h.nextID += 2
	h.cur = s
	defer func() { h.cur = nil }()

	if err := h.writeRequest(s, method, msg); err != nil {
		return nil, h.ioError(ctx, err, true)
	}
	for !s.done {
		if err := h.readFrame(); err != nil {
			return nil, h.ioError(ctx, err, false)
		}
	}
	if s.err != nil {
		return nil, s.err
	}
	return message(s.data)
}

// writeRequest writes the HEADERS and DATA of the call, waiting for flow
// control if the message is larger than the windows allow.
func (h *h2conn) writeRequest(s *stream, method string, msg []byte) error {
	h.hbuf.Reset()
	h.header(":method", "POST")
	h.header(":scheme", h.headerScheme)
	h.header(":path", method)
	h.header(":authority", "localhost")
	h.header("content-type", "application/grpc")
	h.header("te", "trailers")
	if !s.deadline.IsZero() {
		h.header("grpc-timeout", encodeTimeout(time.Until(s.deadline)))
	}
	block := h.hbuf.Bytes()
	first := block[:min(len(block), int(h.maxFrame))]
	block = block[len(first):]
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: s.id, BlockFragment: first, EndHeaders: len(block) == 0}); err != nil {
		return err
	}
	for len(block) > 0 {
		frag := block[:min(len(block), int(h.maxFrame))]
		block = block[len(frag):]
		if err := h.fr.WriteContinuation(s.id, len(block) == 0, frag); err != nil {
			return err
		}
	}

	for {
		n := min(int64(len(msg)), int64(h.maxFrame), s.send, h.connSend)
		if n > 0 {
			end := n == int64(len(msg))
			if err := h.fr.WriteData(s.id, end, msg[:n]); err != nil {
				return err
			}
			s.send -= n
			h.connSend -= n
			msg = msg[n:]
			if end {
				return h.bw.Flush()
			}
			continue
		}
		// Out of window: what was written goes out, then the server's
		// WINDOW_UPDATEs (or its early answer) come in.
		if err := h.bw.Flush(); err != nil {
			return err
		}
		if err := h.readFrame(); err != nil {
			return err
		}
		if s.done {
			// The server answered before taking the whole request; the
			// stream is left half open, so the connection is not reused.
			h.broken = true
			return h.bw.Flush()
		}
	}
}

func (h *h2conn) header(name, value string) {
	_ = h.henc.WriteField(hpack.HeaderField{Name: name, Value: value})
}

// encodeMessage marshals m after gRPC's five-byte message prefix.
func encodeMessage(m proto.Message) ([]byte, error) {
	msg, err := proto.MarshalOptions{}.MarshalAppend(make([]byte, 5, 5+proto.Size(m)), m)
	if err != nil {
		return nil, err
	}
	msg[0] = 0 // not compressed
	binary.BigEndian.PutUint32(msg[1:5], uint32(len(msg)-5))
	return msg, nil
}

// readFrame reads and handles one frame, first flushing whatever the last
// frames asked to send (acknowledgements, window updates).
func (h *h2conn) readFrame() error {
	if h.bw.Buffered() > 0 {
		if err := h.bw.Flush(); err != nil {
			return err
		}
	}
	f, err := h.fr.ReadFrame()
	if err != nil {
		return err
	}
	s := h.cur
	switch f := f.(type) {
	case *http2.DataFrame:
		return h.onData(s, f)
	case *http2.MetaHeadersFrame:
		if s == nil || f.StreamID != s.id || s.done {
			return nil // a stream this connection has finished with
		}
		h.onHeaders(s, f)
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		if err := f.ForeachSetting(func(st http2.Setting) error {
			switch st.ID {
			case http2.SettingInitialWindowSize:
				delta := int64(st.Val) - h.peerWindow
				h.peerWindow = int64(st.Val)
				if s != nil {
					s.send += delta
				}
			case http2.SettingMaxFrameSize:
				h.maxFrame = st.Val
			case http2.SettingHeaderTableSize:
				h.henc.SetMaxDynamicTableSizeLimit(st.Val)
			}
			return nil
		}); err != nil {
			return err
		}
		return h.fr.WriteSettingsAck()
	case *http2.PingFrame:
		if !f.IsAck() {
			return h.fr.WritePing(true, f.Data)
		}
	case *http2.WindowUpdateFrame:
		switch {
		case f.StreamID == 0:
			h.connSend += int64(f.Increment)
		case s != nil && f.StreamID == s.id:
			s.send += int64(f.Increment)
		}
	case *http2.GoAwayFrame:
		h.goAway = true
		if s != nil && s.id > f.LastStreamID {
			s.done = true
			s.err = &notProcessedError{unavailable("the plugin's server is going away (GOAWAY %v) and did not take the call", f.ErrCode)}
		}
	case *http2.RSTStreamFrame:
		if s != nil && f.StreamID == s.id && !s.done {
			s.done = true
			s.err = rstError(f.ErrCode, s.deadline)
		}
	}
	return nil
}

func (h *h2conn) onData(s *stream, f *http2.DataFrame) error {
	h.connUnacked += f.Length
	if h.connUnacked >= ConnWindow/4 {
		if err := h.fr.WriteWindowUpdate(0, h.connUnacked); err != nil {
			return err
		}
		h.connUnacked = 0
	}
	if s == nil || f.StreamID != s.id || s.done {
		return nil
	}
	if !s.gotHeaders {
		h.broken = true
		s.done, s.err = true, status.Error(codes.Internal, "protocol error: DATA before the response headers")
		return nil
	}
	if len(s.data)+len(f.Data()) > maxMessage+5 {
		h.broken = true
		s.done, s.err = true, status.Errorf(codes.ResourceExhausted, "grpc: received message larger than max (%d)", maxMessage)
		return nil
	}
	s.data = append(s.data, f.Data()...)
	if f.StreamEnded() {
		s.done, s.err = true, status.Error(codes.Internal, "server closed the stream without sending trailers")
		return nil
	}
	s.unacked += f.Length
	if s.unacked >= StreamWindow/4 {
		if err := h.fr.WriteWindowUpdate(s.id, s.unacked); err != nil {
			return err
		}
		s.unacked = 0
	}
	return nil
}

// onHeaders handles the response headers, or the trailers that end the
// call (a trailers-only response is both).
func (h *h2conn) onHeaders(s *stream, f *http2.MetaHeadersFrame) {
	if f.Truncated {
		h.broken = true
		s.done, s.err = true, status.Error(codes.Internal, "response header list too large")
		return
	}
	first := !s.gotHeaders
	s.gotHeaders = true
	if first {
		if code := f.PseudoValue("status"); code != "200" {
			if st := grpcStatus(f.Fields); st != nil {
				s.done, s.err = true, st.Err()
				return
			}
			s.done, s.err = true, httpStatusError(code)
			return
		}
		if !f.StreamEnded() {
			return // headers; the message and trailers follow
		}
	} else if !f.StreamEnded() {
		h.broken = true
		s.done, s.err = true, status.Error(codes.Internal, "protocol error: a second header block that does not end the stream")
		return
	}
	s.done = true
	st := grpcStatus(f.Fields)
	if st == nil {
		s.err = status.Error(codes.Internal, "server closed the stream without a grpc-status")
		return
	}
	s.err = st.Err() // nil for OK
}

// grpcStatus reads grpc-status, grpc-message and grpc-status-details-bin;
// nil when there is no grpc-status.
func grpcStatus(fields []hpack.HeaderField) *status.Status {
	var (
		code, msg, details string
		have               bool
	)
	for _, hf := range fields {
		switch hf.Name {
		case "grpc-status":
			code, have = hf.Value, true
		case "grpc-message":
			msg = decodeMessage(hf.Value)
		case "grpc-status-details-bin":
			details = hf.Value
		}
	}
	if !have {
		return nil
	}
	n, err := strconv.ParseUint(code, 10, 32)
	if err != nil {
		return status.Newf(codes.Internal, "malformed grpc-status %q", code)
	}
	if details != "" {
		raw, err := decodeBinHeader(details)
		if err != nil {
			return status.Newf(codes.Internal, "malformed grpc-status-details-bin: %v", err)
		}
		p := &spb.Status{}
		if err := proto.Unmarshal(raw, p); err != nil {
			return status.Newf(codes.Internal, "malformed grpc-status-details-bin: %v", err)
		}
		if p.GetCode() != int32(n) {
			return status.Newf(codes.Internal, "grpc-status-details-bin code %d does not match grpc-status %d", p.GetCode(), n)
		}
		return status.FromProto(p)
	}
	return status.New(codes.Code(n), msg)
}

func decodeBinHeader(v string) ([]byte, error) {
	if len(v)%4 == 0 {
		return base64.StdEncoding.DecodeString(v)
	}
	return base64.RawStdEncoding.DecodeString(v)
}

// decodeMessage undoes grpc-message's percent-encoding; a malformed value
// is kept as it came.
func decodeMessage(v string) string {
	out, err := url.PathUnescape(v)
	if err != nil {
		return v
	}
	return out
}

// httpStatusError is the status of a response that is not gRPC's, as
// grpc-go maps it.
func httpStatusError(code string) error {
	c := codes.Unknown
	switch code {
	case "400":
		c = codes.Internal
	case "401":
		c = codes.Unauthenticated
	case "403":
		c = codes.PermissionDenied
	case "404":
		c = codes.Unimplemented
	case "429", "502", "503", "504":
		c = codes.Unavailable
	}
	return status.Errorf(c, "unexpected HTTP status code received from server: %s", code)
}

// rstError is the status of a stream the server reset. A server cancels a
// stream whose deadline has passed; that is DeadlineExceeded, as grpc-go's
// client reports it.
func rstError(code http2.ErrCode, deadline time.Time) error {
	switch code {
	case http2.ErrCodeRefusedStream:
		return &notProcessedError{unavailable("the plugin's server refused the stream")}
	case http2.ErrCodeCancel:
		if !deadline.IsZero() && !time.Now().Before(deadline) {
			return status.Error(codes.DeadlineExceeded, context.DeadlineExceeded.Error())
		}
		return status.Error(codes.Canceled, "stream cancelled by the server")
	}
	return status.Errorf(codes.Internal, "stream terminated by RST_STREAM with error code: %v", code)
}

// message returns the one message of a response body.
func message(data []byte) ([]byte, error) {
	if len(data) < 5 {
		return nil, status.Error(codes.Internal, "grpc: the server sent no response message")
	}
	if data[0] != 0 {
		return nil, status.Error(codes.Internal, "grpc: compressed response without a negotiated encoding")
	}
	n := binary.BigEndian.Uint32(data[1:5])
	if uint64(len(data)) != 5+uint64(n) {
		return nil, status.Errorf(codes.Internal, "grpc: response body of %d bytes does not hold one message of %d", len(data)-5, n)
	}
	return data[5:], nil
}

// ioError turns a failed read or write into the call's status, and marks
// the connection broken. A write that failed because the server had
// already closed the connection did not reach a handler.
func (h *h2conn) ioError(ctx context.Context, err error, writing bool) error {
	h.broken = true
	if ctxErr := ctx.Err(); ctxErr != nil {
		return status.FromContextError(ctxErr).Err()
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
			return status.Error(codes.DeadlineExceeded, context.DeadlineExceeded.Error())
		}
	}
	if writing && (errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)) {
		return &notProcessedError{unavailable("connection error: %v", err)}
	}
	return unavailable("connection error: %v", err)
}

// encodeTimeout writes d as grpc-timeout: at most eight digits and a unit,
// rounded up.
func encodeTimeout(d time.Duration) string {
	const maxValue = 99999999
	if d <= 0 { // the deadline passed while the headers were written
		return "0n"
	}
	for _, u := range []struct {
		d    time.Duration
		unit string
	}{{time.Nanosecond, "n"}, {time.Microsecond, "u"}, {time.Millisecond, "m"}, {time.Second, "S"}, {time.Minute, "M"}} {
		if v := (d + u.d - 1) / u.d; v <= maxValue {
			return strconv.FormatInt(int64(v), 10) + u.unit
		}
	}
	return strconv.FormatInt(int64((d+time.Hour-1)/time.Hour), 10) + "H"
}
