package network

import (
	"net"
	"net/netip"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

// resolver answers DNS queries on one app's gateway. It knows only that app's names, so
// a machine cannot learn anything about other apps by asking; names outside the app's
// domain get REFUSED (kiln forwards nothing: egress name resolution is the image's
// business).
type resolver struct {
	conn *net.UDPConn
	app  string
	m    *Manager
}

func newResolver(gw netip.Addr, app string, m *Manager) (*resolver, error) {
	conn, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(gw, 53)))
	if err != nil {
		return nil, err
	}
	r := &resolver{conn: conn, app: app, m: m}
	go r.serve()
	return r, nil
}

func (r *resolver) Close() { r.conn.Close() }

func (r *resolver) serve() {
	buf := make([]byte, 1500)
	for {
		n, from, err := r.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		if resp := r.answer(buf[:n]); resp != nil {
			r.conn.WriteToUDPAddrPort(resp, from)
		}
	}
}

func (r *resolver) answer(q []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil || h.Response {
		return nil
	}
	qs, err := p.AllQuestions()
	if err != nil || len(qs) != 1 {
		return nil
	}
	question := qs[0]
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
	name := strings.ToLower(strings.TrimSuffix(question.Name.String(), "."))
	domain := r.app + "." + r.m.cfg.DomainSuffix
	inApp := name == domain || strings.HasSuffix(name, "."+domain)
	var addrs []netip.Addr
	switch {
	case !inApp:
		rh.RCode = dnsmessage.RCodeRefused
		rh.Authoritative = false
	default:
		addrs = r.m.resolve(r.app, name)
		if len(addrs) == 0 {
			rh.RCode = dnsmessage.RCodeNameError
		}
	}
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), rh)
	b.EnableCompression()
	b.StartQuestions()
	b.Question(question)
	b.StartAnswers()
	if question.Type == dnsmessage.TypeA || question.Type == dnsmessage.TypeALL {
		for _, a := range addrs {
			b.AResource(dnsmessage.ResourceHeader{Name: question.Name, Class: dnsmessage.ClassINET, TTL: 5},
				dnsmessage.AResource{A: a.As4()})
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}
